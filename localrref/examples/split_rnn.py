"""An RNN split across workers, trained with distributed autograd and DistributedOptimizer.

    python -m localrref.launch --nproc-per-node 3 -m localrref.examples.split_rnn

Rank 0 ("ps") holds the embedding table, a
:class:`~localrref.nn.RemoteModule` that it hands to every trainer and that
all of them train. Every other rank ("trainer<r>") keeps its own LSTM here
and its own decoder on the server (a RemoteModule it creates there), and
learns to predict the next token of sequences from a fixed rule: each step
embeds a batch on the server, runs the LSTM here, decodes on the server,
and then runs ``localrref.autograd.backward`` and a
:class:`~localrref.optim.DistributedOptimizer` step over the parameters of
all three parts (torch's distributed RNN tutorial, with several trainers).

Why a decoder per trainer: a linear layer saves its weight for backward,
and another trainer's optimizer step could change it in between (autograd
then refuses the stale weight, on torch as here). An embedding saves only
the indices, so trainers can share the table.

The run ends with the trainers' final loss against a target, the
throughput and the leak check. It is written for ``torch.distributed.rpc``
too: swap the imports for torch's.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch import nn

import localrref as rpc
import localrref.autograd as dist_autograd
from localrref.nn import RemoteModule
from localrref.optim import DistributedOptimizer

VOCAB, EMBED, HIDDEN = 32, 16, 64


def sequences(generator: torch.Generator, batch: int, length: int):
    """Token sequences that follow ``next = (3 * token + 1) % VOCAB``; inputs and targets."""
    start = torch.randint(0, VOCAB, (batch, 1), generator=generator)
    tokens = [start]
    for _ in range(length):
        tokens.append((3 * tokens[-1] + 1) % VOCAB)
    seq = torch.cat(tokens, dim=1)
    return seq[:, :-1], seq[:, 1:]


class Embedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.table = nn.Embedding(VOCAB, EMBED)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table(tokens)


class Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.linear = nn.Linear(HIDDEN, VOCAB)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden)


def run_trainer(embedding: RemoteModule, steps: int, batch: int, length: int, lr: float,
                seed: int) -> dict:
    """On a trainer: ``steps`` steps of split training; its losses and time."""
    decoder = RemoteModule("ps/cpu", Decoder)
    torch.manual_seed(seed)
    lstm = nn.LSTM(EMBED, HIDDEN, batch_first=True)
    params = (embedding.remote_parameters() + decoder.remote_parameters()
              + [rpc.RRef(p) for p in lstm.parameters()])
    optimizer = DistributedOptimizer(torch.optim.Adam, params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    name = rpc.get_worker_info().name
    losses = []
    started = time.perf_counter()
    for step in range(1, steps + 1):
        inputs, targets = sequences(generator, batch, length)
        with dist_autograd.context() as context_id:
            hidden, _ = lstm(embedding.forward(inputs))
            logits = decoder.forward(hidden)
            loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
            dist_autograd.backward(context_id, [loss])
            optimizer.step(context_id)
        losses.append(loss.item())
        if step % max(1, steps // 4) == 0:
            print(f"{name}: step {step}/{steps}, loss {loss.item():.4f}", flush=True)
    return {"losses": losses, "samples": steps * batch, "seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=12)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--target-loss", type=float, default=0.1)
    args = parser.parse_args(argv)

    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if world_size < 2:
        raise SystemExit("split_rnn needs at least 2 processes (--nproc-per-node 2 or more)")
    name = "ps" if rank == 0 else f"trainer{rank}"
    rpc.init_rpc(name, rank=rank, world_size=world_size)
    if rank == 0:
        embedding = RemoteModule("ps/cpu", Embedding)
        started = time.perf_counter()
        futures = [rpc.rpc_async(f"trainer{r}", run_trainer,
                                 args=(embedding, args.steps, args.batch, args.length, args.lr,
                                       1000 + r))
                   for r in range(1, world_size)]
        results = torch.futures.wait_all(futures)
        elapsed = time.perf_counter() - started
        first = sum(r["losses"][0] for r in results) / len(results)
        # the mean of each trainer's last 10 steps: one batch is noisy
        final = sum(sum(r["losses"][-10:]) / len(r["losses"][-10:]) for r in results) / len(results)
        samples = sum(r["samples"] for r in results)
        verdict = "reached" if final <= args.target_loss else "MISSED"
        print(f"ps: {len(results)} trainers, loss {first:.4f} -> {final:.4f} "
              f"({verdict} target {args.target_loss}), {samples / elapsed:,.0f} sequences/s, "
              f"{elapsed:.2f} s", flush=True)
        del embedding
    rpc.shutdown()
    if rank == 0:
        print("ps: shutdown complete", flush=True)


if __name__ == "__main__":
    main()
