"""A parameter server and its trainers, the main job of localrref.

    python -m localrref.launch --nproc-per-node 4 -m localrref.examples.parameter_server

Rank 0 ("ps") holds a model behind an RRef; every other rank ("trainer<r>")
receives that RRef, and for each step fetches the parameters
(``ps_rref.rpc_sync().get_parameters()``), computes gradients on a synthetic
regression batch, and pushes them back (``ps_rref.rpc_sync().apply_gradients``).
The server averages nothing and locks nothing fancy: it applies each
trainer's gradients as they come (asynchronous SGD), under one lock.

The run ends with one line: the final loss, the throughput and the leak
check. It is written for ``torch.distributed.rpc`` too: swap the import.
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import torch

import localrref as rpc

FEATURES = 32


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(FEATURES, 64), torch.nn.Tanh(),
                               torch.nn.Linear(64, 1))


def synthetic_batch(generator: torch.Generator, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    # A fixed "true" function so every trainer learns the same thing.
    x = torch.randn(batch, FEATURES, generator=generator)
    w = torch.linspace(-1, 1, FEATURES)
    y = torch.tanh(x @ w / 4).unsqueeze(1) + 0.01 * torch.randn(batch, 1, generator=generator)
    return x, y


class ParameterServer:
    def __init__(self, lr: float) -> None:
        self.model = make_model()
        self.lr = lr
        self.lock = threading.Lock()
        self.updates = 0

    def get_parameters(self) -> list[torch.Tensor]:
        with self.lock:
            return [p.detach().clone() for p in self.model.parameters()]

    def apply_gradients(self, grads: list[torch.Tensor]) -> int:
        with self.lock:
            with torch.no_grad():
                for param, grad in zip(self.model.parameters(), grads):
                    param -= self.lr * grad
            self.updates += 1
            return self.updates

    def evaluate(self, seed: int, batch: int) -> float:
        x, y = synthetic_batch(torch.Generator().manual_seed(seed), batch)
        with self.lock, torch.no_grad():
            return torch.nn.functional.mse_loss(self.model(x), y).item()


def run_trainer(ps_rref, steps: int, batch: int, seed: int) -> dict:
    """On a trainer: pull, compute, push, ``steps`` times."""
    model = make_model()
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    name = rpc.get_worker_info().name
    for step in range(1, steps + 1):
        params = ps_rref.rpc_sync().get_parameters()
        with torch.no_grad():
            for mine, theirs in zip(model.parameters(), params):
                mine.copy_(theirs)
        x, y = synthetic_batch(generator, batch)
        model.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        ps_rref.rpc_sync().apply_gradients([p.grad for p in model.parameters()])
        if step % max(1, steps // 4) == 0:
            print(f"{name}: step {step}/{steps}, batch loss {loss.item():.4f}", flush=True)
    return {"steps": steps, "samples": steps * batch, "seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--target-loss", type=float, default=0.02)
    args = parser.parse_args(argv)

    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    name = "ps" if rank == 0 else f"trainer{rank}"
    rpc.init_rpc(name, rank=rank, world_size=world_size)
    if rank == 0:
        ps_rref = rpc.RRef(ParameterServer(args.lr))
        initial = ps_rref.local_value().evaluate(seed=12345, batch=1024)
        started = time.perf_counter()
        futures = [rpc.rpc_async(f"trainer{r}", run_trainer,
                                 args=(ps_rref, args.steps, args.batch, 1000 + r))
                   for r in range(1, world_size)]
        results = torch.futures.wait_all(futures)
        elapsed = time.perf_counter() - started
        final = ps_rref.local_value().evaluate(seed=12345, batch=1024)
        samples = sum(r["samples"] for r in results)
        print(f"ps: {len(results)} trainers, {ps_rref.local_value().updates} updates, "
              f"loss {initial:.4f} -> {final:.4f}", flush=True)
        verdict = "reached" if final <= args.target_loss else "MISSED"
        print(f"ps: final loss {final:.4f} ({verdict} target {args.target_loss}), "
              f"{samples / elapsed:,.0f} samples/s, {elapsed:.2f} s", flush=True)
        del ps_rref
    rpc.shutdown()
    if rank == 0:
        print("ps: shutdown complete", flush=True)


if __name__ == "__main__":
    main()
