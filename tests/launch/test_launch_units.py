"""Pieces of localrref.launch that need no worker processes: CLI parsing, formats, records."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import random
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest

from localrref import control_messages as cm
from localrref import world
from localrref.launch import errorfile, paused_gc
from localrref.launch.bootstrap import ChildPlan, RunScript, Stream
from localrref.launch.cli import UsageError, config_from_args, parse_args
from localrref.launch.control import ControlDispatcher, format_leak_line
from localrref.launch.launcher import main
from localrref.launch.stdio import Std, line_prefix, parse_std
from localrref.launch.supervisor import RunOptions
from localrref.transport.segment import segment_prefix, sweep_world_segments


# ------------------------------------------------------------------------ world.py


def _spec(**overrides):
    fields = dict(world_id="abc123", rank=1, world_size=2, inboxes=("q0", "q1", "qs"), supervisor_pid=7)
    fields.update(overrides)
    return world.WorldSpec(**fields)


def test_worldspec_views_and_pickling():
    spec = _spec()
    assert (spec.inbox, spec.supervisor_inbox, spec.supervisor_rank) == ("q1", "qs", 2)
    assert segment_prefix(spec.world_id) == "lrr_abc123_"
    assert pickle.loads(pickle.dumps(spec)) == spec


@pytest.mark.parametrize("overrides, message", [
    ({"world_id": "Has-Dash"}, "world_id 'Has-Dash' must be 1-16 lowercase letters or digits"),
    ({"rank": 2}, r"rank 2 is outside \[0, 2\)"),
    ({"inboxes": ("q0", "q1")}, "expected 3 inboxes"),
    ({"world_size": 0, "rank": 0, "inboxes": ("q",)}, "world_size must be >= 1"),
])
def test_worldspec_rejects_inconsistent_fields(overrides, message):
    with pytest.raises(ValueError, match=message):
        _spec(**overrides)


def test_the_spawn_command_line_pauses_the_collector_before_spawn_main():
    cmd = paused_gc._command_line_with_pause(tracker_fd=7, pipe_handle=9)
    program = cmd[cmd.index("-c") + 1]
    assert program.startswith("import gc; gc.disable(); ")
    assert program.endswith("spawn_main(tracker_fd=7, pipe_handle=9)")
    spawn_ctx, fork_ctx = multiprocessing.get_context("spawn"), multiprocessing.get_context("fork")
    assert paused_gc.process_class(spawn_ctx) is paused_gc.SpawnProcess
    assert paused_gc.process_class(fork_ctx) is fork_ctx.Process


@pytest.mark.parametrize("switch, frozen", [("", True), ("0", False)])
def test_the_first_init_rpc_freezes_what_exists_once(switch, frozen):
    # In a process of its own: freezing is for the life of the process.
    program = (
        "import gc\n"
        "from localrref.launch import paused_gc\n"
        "paused_gc.freeze_at_first_init()\n"
        "first = gc.get_freeze_count()\n"
        "later = [[] for _ in range(1000)]\n"
        "paused_gc.freeze_at_first_init()\n"
        "print(first, gc.get_freeze_count())\n")
    env = {**os.environ, paused_gc.SWITCH_ENV: switch}
    done = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True,
                          text=True, timeout=60, check=True)
    first, second = map(int, done.stdout.split())
    assert (first > 0) is frozen
    assert second == first  # the second call froze nothing new


def test_peer_exited_describes_the_death():
    exited = cm.PeerExited(rank=3, pid=1234, exitcode=-9)
    assert exited.describe() == "worker rank 3 (pid 1234) was killed by signal SIGKILL"
    assert cm.describe_exitcode(2) == "exited with code 2"
    assert cm.describe_exitcode(-200) == "was killed by signal <unknown signal 200>"


def test_install_and_current():
    assert world.current() is None
    spec = _spec()
    world.install(spec)
    try:
        assert world.current() is spec
    finally:
        world.install(None)


# ---------------------------------------------------------------------- control.py


class _Sent:
    def __init__(self):
        self.sent = []

    def __call__(self, rank, control):
        self.sent.append((rank, control))


def test_dispatcher_collects_and_extends(capsys):
    dispatcher = ControlDispatcher(2, _Sent())
    dispatcher.dispatch(0, cm.LeakReport(rank=0, leaks=[{"rref_id": "0:1", "state": "OWNER"}]))
    seen = []

    @dataclasses.dataclass(frozen=True)
    class Custom:
        value: int

    dispatcher.register(Custom, lambda src, message: seen.append((src, message)))
    dispatcher.dispatch(1, Custom(5))
    dispatcher.dispatch(1, ("__nope__", 1))
    assert dispatcher.leaks == [{"rref_id": "0:1", "state": "OWNER", "reporting_rank": 0}]
    assert seen == [(1, Custom(5))]
    err = capsys.readouterr().err
    assert "unknown type tuple from rank 1" in err
    assert format_leak_line(dispatcher.leaks[0]) == (
        "localrref: leaked RRef rref_id=0:1 fork_id=? owner_rank=? holder_rank=? state=OWNER "
        "value_type=? tensor_bytes=? creation_site=?")


def test_shutdown_barrier_proceeds_three_times_then_can_run_again():
    send = _Sent()
    dispatcher = ControlDispatcher(2, send)
    dispatcher.dispatch(1, cm.ShutdownArrived(rank=1))
    assert send.sent == []
    dispatcher.dispatch(0, cm.ShutdownArrived(rank=0))
    assert send.sent == PROCEED
    for _ in range(2):  # the drain: a first round, then one that proves it
        dispatcher.dispatch(0, cm.ShutdownDrained(rank=0, sent=0, received=0))
        dispatcher.dispatch(1, cm.ShutdownDrained(rank=1, sent=0, received=0))
    assert send.sent[2:] == AGAIN + PROCEED
    del send.sent[2:4]
    dispatcher.dispatch(0, cm.ShutdownDone(rank=0, leaks=[{"rref_id": "0:3"}]))
    dispatcher.dispatch(1, cm.ShutdownDone(rank=1, leaks=[]))
    assert send.sent[4:] == PROCEED
    assert dispatcher.leaks == [{"rref_id": "0:3", "reporting_rank": 0}]
    dispatcher.dispatch(1, cm.ShutdownFinished(rank=1))
    assert len(send.sent) == 6
    dispatcher.dispatch(0, cm.ShutdownFinished(rank=0))
    assert send.sent[6:] == PROCEED
    dispatcher.dispatch(1, cm.ShutdownArrived(rank=1))  # a later init_rpc/shutdown
    dispatcher.dispatch(0, cm.ShutdownArrived(rank=0))
    assert len(send.sent) == 10
    assert dispatcher.shutdown_arrived == [1, 0, 1, 0]


PROCEED = [(0, cm.ShutdownProceed()), (1, cm.ShutdownProceed())]
AGAIN = [(0, cm.ShutdownAgain()), (1, cm.ShutdownAgain())]


def _failed(reason):
    return [(0, cm.ShutdownFailed(reason=reason)), (1, cm.ShutdownFailed(reason=reason))]


def _arrived(dispatcher, send, n=2):
    for rank in range(n):
        dispatcher.dispatch(rank, cm.ShutdownArrived(rank=rank))
    send.sent.clear()


def test_the_drain_proceeds_once_a_rounds_sends_equal_the_previous_rounds_receipts():
    send = _Sent()
    dispatcher = ControlDispatcher(2, send)
    _arrived(dispatcher, send)
    dispatcher.dispatch(1, cm.ShutdownDrained(rank=1, sent=2, received=3))
    assert send.sent == []
    dispatcher.dispatch(0, cm.ShutdownDrained(rank=0, sent=5, received=3))
    assert send.sent == AGAIN  # a first round proves nothing (received 6)
    dispatcher.dispatch(0, cm.ShutdownDrained(rank=0, sent=7, received=5))
    dispatcher.dispatch(1, cm.ShutdownDrained(rank=1, sent=3, received=5))
    assert send.sent[2:] == AGAIN  # sent 10, but 6 received before: work moved on
    dispatcher.dispatch(0, cm.ShutdownDrained(rank=0, sent=7, received=5))
    dispatcher.dispatch(0, cm.ShutdownDrained(rank=0, sent=7, received=5))  # twice: ignored
    assert send.sent[4:] == []
    dispatcher.dispatch(1, cm.ShutdownDrained(rank=1, sent=3, received=5))
    assert send.sent[4:] == PROCEED and dispatcher.drain_rounds == 3
    dispatcher.dispatch(0, cm.ShutdownDone(rank=0, leaks=[]))
    dispatcher.dispatch(1, cm.ShutdownDone(rank=1, leaks=[]))
    assert send.sent[6:] == PROCEED


@pytest.mark.parametrize("chunk", range(5))
def test_the_drain_never_proceeds_while_a_call_is_in_flight(chunk):
    """A model world: a worker that gets a message sends none, one or two on
    (a reply ends a chain, a job fans out); a round's reports come in any
    order, interleaved with deliveries. The supervisor's real dispatcher must
    never proceed while a message is in flight, and must proceed once all is
    quiet. (A rule that trusts one round's sums fails here within a few
    hundred seeds.)"""
    for seed in range(chunk * 200, (chunk + 1) * 200):
        _drain_model(seed)


def _drain_model(seed):
    rng = random.Random(seed)
    n = rng.randint(2, 5)
    sent, received, in_flight = [0] * n, [0] * n, []

    def send_from(src):
        sent[src] += 1
        in_flight.append(rng.randrange(n))

    for _ in range(rng.randint(0, 4)):
        send_from(rng.randrange(n))
    budget = rng.randint(0, 80)
    send = _Sent()
    dispatcher = ControlDispatcher(n, send)
    _arrived(dispatcher, send, n)
    to_report = rng.sample(range(n), n)
    p_deliver = rng.uniform(0.3, 0.7)
    for _ in range(10_000):
        if in_flight and (not to_report or rng.random() < p_deliver):
            dst = in_flight.pop(rng.randrange(len(in_flight)))
            received[dst] += 1
            for _ in range(rng.choice((0, 1, 1, 2))):
                if budget:
                    budget -= 1
                    send_from(dst)
            continue
        rank = to_report.pop()
        dispatcher.dispatch(rank, cm.ShutdownDrained(rank=rank, sent=sent[rank], received=received[rank]))
        if send.sent:
            (_, message), *_ = send.sent
            send.sent.clear()
            if isinstance(message, cm.ShutdownProceed):
                assert not in_flight, \
                    f"seed {seed}: proceeded with {len(in_flight)} message(s) in flight"
                return
            assert isinstance(message, cm.ShutdownAgain)
            to_report = rng.sample(range(n), n)
    raise AssertionError(f"seed {seed}: the drain never proceeded")


def test_the_drain_fails_naming_a_rank_that_dies_or_never_finishes():
    send = _Sent()
    dispatcher = ControlDispatcher(3, send)
    _arrived(dispatcher, send, 3)
    dispatcher.dispatch(0, cm.ShutdownDrained(rank=0, sent=0, received=0))
    dispatcher.on_worker_exit(2, 1)
    reason = "worker rank 2 exited with code 1 before it reached the shutdown barrier (drain phase)"
    assert send.sent == _failed(reason)

    clock = [100.0]
    send = _Sent()
    dispatcher = ControlDispatcher(2, send, arrive_timeout=5.0, clock=lambda: clock[0])
    _arrived(dispatcher, send)
    dispatcher.dispatch(0, cm.ShutdownDrained(rank=0, sent=0, received=0))
    dispatcher.dispatch(1, cm.ShutdownDrained(rank=1, sent=3, received=0))
    assert send.sent == AGAIN
    clock[0] = 104.0
    dispatcher.dispatch(0, cm.ShutdownDrained(rank=0, sent=0, received=0))
    dispatcher.check_deadline(clock[0])
    assert send.sent[2:] == []
    clock[0] = 105.5  # the drain as a whole is bounded, whatever its rounds
    dispatcher.check_deadline(clock[0])
    reason = ("worker rank(s) [1] did not finish the calls it had in flight within 5 s "
              "(--shutdown-timeout); the others gave up waiting")
    assert send.sent[2:] == _failed(reason)


# -------------------------------------------------------------------- errorfile.py


def test_failure_summary_matches_torchs_child_failed_error(tmp_path):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    error_file = str(tmp_path / "error.json")
    try:
        raise RuntimeError("rank 1 broke")
    except RuntimeError as exc:
        errorfile.write_error_file(error_file, exc, "Traceback (most recent call last):\nRuntimeError: rank 1 broke\n")
    with open(error_file) as fh:
        assert json.load(fh)["message"]["message"] == "RuntimeError: rank 1 broke"
    now = time.time()
    ours = [
        errorfile.Failure.observe(rank=1, local_rank=1, pid=11, exitcode=1, error_file=error_file, exited_at=now),
        errorfile.Failure.observe(rank=0, local_rank=0, pid=10, exitcode=-15, error_file=None, exited_at=now + 5),
        errorfile.Failure.observe(rank=2, local_rank=2, pid=12, exitcode=3, error_file=None, exited_at=now + 5),
    ]
    theirs = {1: ProcessFailure(local_rank=1, pid=11, exitcode=1, error_file=error_file)}
    for rank, pid, code in ((0, 10, -15), (2, 12, 3)):
        failure = ProcessFailure(local_rank=rank, pid=pid, exitcode=code, error_file="/nonexistent")
        failure.timestamp = int(now + 5)
        theirs[rank] = failure
    expected = ChildFailedError("train.py", theirs).format_msg()
    assert errorfile.format_failure_summary("train.py", ours) == expected
    assert "Root Cause (first observed failure):\n[0]:" in expected


def test_error_file_absent_or_garbage_reads_as_none(tmp_path):
    assert errorfile.read_error_file(str(tmp_path / "missing.json")) is None
    (tmp_path / "bad.json").write_text("{not json")
    assert errorfile.read_error_file(str(tmp_path / "bad.json")) is None


# ------------------------------------------------------------------------ bootstrap


def test_child_records_validate():
    with pytest.raises(ValueError, match="mode must be path, module or exec"):
        RunScript(mode="shell", target="x")
    with pytest.raises(ValueError, match="Stream kind 'file' needs path"):
        Stream(kind="file")
    assert ChildPlan(error_file="e").stdout == Stream(kind="inherit")


# ------------------------------------------------------------------ supervisor bits


def test_run_options_resolve_env(monkeypatch):
    monkeypatch.setenv("LOCALRREF_STRICT_LEAKS", "1")
    monkeypatch.setenv("LOCALRREF_RECORD_CREATION_SITES", "0")
    assert RunOptions.resolve() == RunOptions(strict_leaks=True, record_creation_sites=False)
    assert RunOptions.resolve(strict_leaks=False, shutdown_timeout=3).strict_leaks is False
    with pytest.raises(ValueError, match="shutdown_timeout must be >= 0"):
        RunOptions(shutdown_timeout=-1)


def test_the_sweep_removes_only_its_world(tmp_path):
    for name in ("lrr_w1_a", "lrr_w1_b", "lrr_w10_a", "lrr_w2_a", "other"):
        (tmp_path / name).write_bytes(b"")
    assert sweep_world_segments("w1", shm_dir=str(tmp_path)) == ["lrr_w1_a", "lrr_w1_b"]
    assert sorted(os.listdir(tmp_path)) == ["lrr_w10_a", "lrr_w2_a", "other"]


# ------------------------------------------------------------------------------ CLI


def _config(*argv):
    return config_from_args(parse_args([*argv, "train.py", "--lr", "1"]))


def test_both_spellings_and_script_args():
    a = _config("--nproc-per-node", "3", "--max-restarts", "2", "--start-method", "forkserver")
    b = _config("--nproc_per_node=3", "--max_restarts=2", "--start_method=forkserver")
    for config in (a, b):
        assert (config.nprocs, config.max_restarts, config.start_method) == (3, 2, "forkserver")
        assert (config.mode, config.target, config.target_args) == ("path", "train.py", ("--lr", "1"))


def test_pet_environment_defaults(monkeypatch):
    monkeypatch.setenv("PET_NPROC_PER_NODE", "4")
    monkeypatch.setenv("PET_MODULE", "1")
    monkeypatch.setenv("PET_TEE", "3")
    config = _config()
    assert (config.nprocs, config.mode, config.tee) == (4, "module", Std.ALL)
    assert _config("--nproc-per-node", "2").nprocs == 2  # the command line wins


def test_flags_and_values():
    config = _config("--standalone", "-r", "0:1,1:2", "--local-ranks-filter", "0,2", "--master-port", "1234",
                     "--shutdown-timeout", "7", "--strict-leaks", "--signals-to-handle", "SIGTERM,USR1",
                     "--rdzv-id", "myrun")
    assert config.redirects == {0: Std.OUT, 1: Std.ERR}
    assert config.local_ranks_filter == frozenset({0, 2})
    assert (config.master_port, config.shutdown_timeout, config.strict_leaks) == (1234, 7.0, True)
    assert config.signals_to_handle == (signal.SIGTERM, signal.SIGUSR1)
    assert config.run_id != "myrun"  # --standalone picks a fresh run id, as torchrun does
    assert _config("--rdzv-id", "myrun").run_id == "myrun"
    assert _config("--no-python").mode == "exec"
    assert _config().strict_leaks is None  # left to LOCALRREF_STRICT_LEAKS


@pytest.mark.parametrize("argv, message", [
    (["--nnodes", "2"], "--nnodes=2 asks for several nodes"),
    (["--nnodes", "1:4"], "--nnodes=1:4 asks for several nodes"),
    (["--node-rank", "1"], "--node-rank=1 only makes sense with several nodes"),
    (["--rdzv-backend", "etcd"], "--rdzv-backend=etcd is a multi-node rendezvous"),
    (["--rdzv-endpoint", "node7:29400"], "--rdzv-endpoint=node7:29400 points at another host"),
])
def test_multi_node_flags_point_to_torchrun(argv, message):
    with pytest.raises(UsageError, match=message) as info:
        _config(*argv)
    assert "start the same script with torchrun" in str(info.value)
    assert "torch.distributed.rpc" in str(info.value)


def test_local_rendezvous_settings_are_accepted():
    assert _config("--nnodes", "1:1", "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0").nprocs == 1


@pytest.mark.parametrize("argv, message", [
    (["-m", "--no-python"], "Don't use both the '--no-python' flag and the '--module' flag"),
    (["--redirects", "7"], "--redirects/--tee"),
    (["--local-ranks-filter", "a"], "--local-ranks-filter must be a comma-separated list"),
    (["--nproc-per-node", "gpu"], "localrref runs CPU processes"),
    (["--signals-to-handle", "SIGNOPE"], "unknown signal 'SIGNOPE'"),
])
def test_bad_flags_are_usage_errors(argv, message):
    with pytest.raises(UsageError, match=message):
        _config(*argv)


def test_main_turns_usage_errors_into_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--nnodes", "2", "train.py"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "runs every worker on this one machine" in err and "torchrun" in err


def test_std_parsing_and_prefix(monkeypatch):
    assert parse_std("0") == Std.NONE and parse_std("3") == Std.ALL
    assert parse_std("0:3,1:0") == {0: Std.ALL, 1: Std.NONE}
    with pytest.raises(ValueError):
        parse_std("4")
    monkeypatch.delenv("TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE", raising=False)
    assert line_prefix(2, "default") == "[default2]:"
    monkeypatch.setenv("TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE", "[${role_name}${local_rank}]:")
    assert line_prefix(2, "default") == "[default2]:"


def test_simplequeue_internals_the_inbox_helpers_rely_on():
    queue = multiprocessing.get_context("spawn").SimpleQueue()
    try:
        assert queue._reader.fileno() >= 0 and queue._writer.fileno() >= 0
    finally:
        queue.close()
