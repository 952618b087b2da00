"""Worlds met through a rendezvous, with real processes started every way torch users start them.

``torch.multiprocessing.spawn``, ``multiprocessing.Process``, separate
processes started by hand with ``RANK``/``WORLD_SIZE``, torchrun
``--standalone``; under ``env://``, ``tcp://`` and ``file://``; deaths of
any rank and of the supervisor; and the bad inputs, each with its error.
After every run nothing is left: no process (conftest), no world
directory, no /dev/shm segment.

Each test uses its own rendezvous root (``LOCALRREF_RUNTIME_DIR``), so the
ports below never collide with another run's.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch.multiprocessing as tmp

import lrr_rdv_programs as programs
from localrref.launch import rendezvous_dir
from localrref.launch.join import NotThisHostError, join
from localrref.launch.rendezvous import Member, WorldRecord, parse_init_method
from localrref.testing.programs import run_program
from localrref.transport.fifo import make_fifos
from localrref.transport.segment import world_segments

HERE = pathlib.Path(__file__).parent
PROGRAMS = HERE / "lrr_rdv_programs.py"
RUN_TIMEOUT = 120


@pytest.fixture
def root(tmp_path, monkeypatch):
    path = tmp_path / "rt"
    path.mkdir(mode=0o700)
    monkeypatch.setenv(rendezvous_dir.RUNTIME_DIR_ENV, str(path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])]))
    return path


@pytest.fixture
def outdir(tmp_path):
    path = tmp_path / "out"
    path.mkdir()
    return path


@pytest.fixture
def master(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "localhost")
    monkeypatch.setenv("MASTER_PORT", "29611")


def results(outdir, world_size):
    return [json.loads((outdir / f"rank{r}.json").read_text()) for r in range(world_size)]


def wait_gone(pids):
    """Wait for processes that are not our children (the supervisors) to exit."""
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(procs, timeout=RUN_TIMEOUT)
    assert alive == [], f"still running: {alive}"


def assert_nothing_left(root, world_ids, supervisors=()):
    # The supervisor cleans up once every member is gone: wait for it first.
    wait_gone(supervisors)
    assert sorted(p.name for p in root.iterdir()) == ["rendezvous.lock"], \
        f"left in the rendezvous root: {list(root.iterdir())}"
    for world_id in world_ids:
        assert world_segments(world_id) == [], f"segments of world {world_id} left in /dev/shm"


def assert_basic(outdir, world_size, rounds=2):
    seen = results(outdir, world_size)
    for i in range(rounds):
        ids = {r["rounds"][i]["world_id"] for r in seen}
        assert len(ids) == 1, f"round {i}: ranks met in different worlds {ids}"
        sums = seen[0]["rounds"][i]["sums"]
        assert sums == [[[1.0 + p] * 4, 1000.0 * p, 1000.0 * p] for p in range(1, world_size)]
    # Each init_rpc after shutdown() started a new world.
    assert len({r["world_id"] for r in seen[0]["rounds"]}) == rounds
    return [r["world_id"] for r in seen[0]["rounds"]], [r["supervisor_pid"] for r in seen[0]["rounds"]]


# ------------------------------------------------------------------ ways in


def test_torch_multiprocessing_spawn_with_env_and_init_rpc_again_after_shutdown(root, outdir,
                                                                               master):
    tmp.spawn(programs.basic, args=(3, str(outdir)), nprocs=3, join=True)
    assert_nothing_left(root, *assert_basic(outdir, 3))


def test_multiprocessing_process_with_tcp(root, outdir):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=programs.basic, args=(rank, 2, str(outdir),
                                                      "tcp://127.0.0.1:29612", 1))
             for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(RUN_TIMEOUT)
    assert [p.exitcode for p in procs] == [0, 0]
    assert_nothing_left(root, *assert_basic(outdir, 2, rounds=1))


def run_by_hand(outdir, world_size, scenario="basic", extra=(), env=None):
    procs = []
    for rank in range(world_size):
        procs.append(subprocess.Popen(
            [sys.executable, str(PROGRAMS), scenario, str(outdir), *extra],
            env={**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world_size), **(env or {})}))
    codes = [p.wait(RUN_TIMEOUT) for p in procs]
    return codes


def test_processes_started_by_hand_with_file_init_method(root, outdir, tmp_path):
    codes = run_by_hand(outdir, 2, extra=(f"file://{tmp_path}/rdv", "1"))
    assert codes == [0, 0]
    assert_nothing_left(root, *assert_basic(outdir, 2, rounds=1))


def test_torchrun_standalone(root, outdir, tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    assert torchrun, "torchrun is installed with torch"
    # Without --log-dir torchrun leaves a torchelastic_* directory in /tmp.
    done = run_program(
        [torchrun, "--log-dir", str(tmp_path / "torchrun-logs"), "--standalone",
         "--nproc-per-node", "2", str(PROGRAMS), "basic", str(outdir)],
        timeout=RUN_TIMEOUT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_nothing_left(root, *assert_basic(outdir, 2))


# ------------------------------------------------------------------ deaths


@pytest.mark.parametrize("victim", [0, 2])
def test_sigkill_of_a_rank_fails_its_peers_calls_at_once_naming_it(root, outdir, master, victim):
    # multiprocessing.Process, not torch's spawn: spawn would SIGTERM the
    # survivors as soon as it saw the victim die, before they could report.
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=programs.kill_a_rank, args=(rank, 3, str(outdir), victim))
             for rank in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(RUN_TIMEOUT)
    assert [p.exitcode for p in procs] == [0 if r != victim else -signal.SIGKILL
                                           for r in range(3)]
    survivors = [r for r in range(3) if r != victim]
    seen = {r: json.loads((outdir / f"rank{r}.json").read_text()) for r in survivors}
    for record in seen.values():
        assert f"rank {victim}" in record["call_error"], record
        assert record["failed_after_s"] < 30, record  # not the 60 s of its call, nor a timeout
        assert f"rank {victim}" in record["shutdown_error"], record
    assert_nothing_left(root, [seen[survivors[0]]["world_id"]],
                        [seen[survivors[0]]["supervisor_pid"]])


def test_torch_spawn_stops_the_world_when_a_rank_dies_and_nothing_is_left(root, outdir, master):
    ctx = tmp.spawn(programs.kill_a_rank, args=(3, str(outdir), 1), nprocs=3, join=False)
    with pytest.raises(tmp.ProcessExitedException, match="process 1 terminated with signal "
                                                         "SIGKILL"):
        while not ctx.join(RUN_TIMEOUT):
            pass
    for process in ctx.processes:
        process.join(RUN_TIMEOUT)
    # torch's spawn SIGTERMed the survivors; the supervisor saw every member go.
    victim = json.loads((outdir / "rank1.json").read_text())
    assert_nothing_left(root, [victim["world_id"]], [victim["supervisor_pid"]])


def test_a_name_taken_twice_fails_every_rank_at_once(root, outdir, master):
    # torch's test_duplicate_name_2: every rank's init_rpc raises "is not
    # unique". The refused rank has the supervisor tell the members, who would
    # otherwise wait for its empty rank until init_rpc timed out (20 s here);
    # a rank arriving later is refused while the world is still there.
    tmp.spawn(programs.duplicate_name, args=(3, str(outdir)), nprocs=3, join=True)
    seen = results(outdir, 3)
    refused = [r for r in seen if r["error"] and "is not unique: it is taken" in r["error"]
               and "cannot form" not in r["error"]]
    assert len(refused) == 1, seen
    for record in seen:
        if record is refused[0]:
            continue
        # A straggler finds the refusal while the doomed world's supervisor
        # lingers (REFUSAL_LINGER_S); one later still (under load) founds a
        # new world, and its init_rpc names the ranks that never came.
        straggler = record["error"] and "timed out after 20 s waiting for ranks" in record["error"]
        assert straggler or ("cannot form" in record["error"]
                             and "'worker0' is not unique" in record["error"]), record
        assert straggler or record["failed_after_s"] < 15, record
    deadline = time.monotonic() + RUN_TIMEOUT
    while sorted(p.name for p in root.iterdir()) != ["rendezvous.lock"]:
        assert time.monotonic() < deadline, f"left behind: {list(root.iterdir())}"
        time.sleep(0.05)


def test_sigkill_of_the_supervisor_fails_graceful_shutdown_naming_it(root, outdir, master):
    tmp.spawn(programs.kill_the_supervisor, args=(2, str(outdir)), nprocs=2, join=True)
    seen = results(outdir, 2)
    assert seen[0]["after"] == [2.0, 2.0]  # calls keep working without it
    for record in seen:
        assert "supervisor of this world" in record["shutdown_error"]
        assert str(record["supervisor_pid"]) in record["shutdown_error"]
    # The last worker out cleaned up in the supervisor's place.
    assert_nothing_left(root, [seen[0]["world_id"]])


# --------------------------------------------------------------- bad input

RDV = parse_init_method("tcp://localhost:29613", {})


def join_elsewhere(rank, world_size, name, method="tcp://localhost:29613"):
    """A second process asking to join; returns its error message (or "joined")."""
    code = (
        "import sys\n"
        "from localrref.launch.join import join\n"
        "from localrref.launch.rendezvous import parse_init_method\n"
        f"rdv = parse_init_method({method!r}, {{}})\n"
        "try:\n"
        f"    m = join(rdv, rank={rank}, world_size={world_size}, name={name!r}, "
        "shutdown_timeout=5)\n"
        "except RuntimeError as exc:\n"
        "    print(exc); sys.exit(0)\n"
        "m.leave(False); print('joined')\n")
    done = run_program([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=RUN_TIMEOUT)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.fixture
def founded(root):
    membership = join(RDV, rank=0, world_size=3, name="ps", shutdown_timeout=5)
    yield membership
    membership.leave(False)
    membership.supervisor.wait(RUN_TIMEOUT)
    assert_nothing_left(root, [membership.spec.world_id])


def test_two_processes_claiming_one_rank(founded):
    message = join_elsewhere(0, 3, "other")
    assert "two processes claim rank 0" in message and str(os.getpid()) in message


def test_world_sizes_that_disagree(founded):
    message = join_elsewhere(1, 4, "trainer")
    assert "world size mismatch" in message and "world_size=4" in message and "3 workers" in message


def test_a_name_taken_twice(founded):
    message = join_elsewhere(1, 3, "ps")
    assert "'ps' is not unique: it is taken" in message


def test_a_refusal_sent_while_the_supervisor_starts_waits_in_its_inbox(root, monkeypatch):
    # A process refused at the rendezvous writes ArrivalRefused into the
    # supervisor's inbox and closes it. Just after the founder released the
    # lock its supervisor may not have opened that FIFO yet; the founder holds
    # every inbox open from the world's creation on, or the kernel would drop
    # the frame with the refuser's close and the members would wait out
    # init_timeout instead of failing at once.
    from localrref.control_messages import ArrivalRefused
    from localrref.launch import join as join_module
    from localrref.launch.inbox import InboxReader
    from localrref.launch.rendezvous import Arrival
    from localrref.transport import wire

    real_popen = subprocess.Popen
    started = []

    def still_starting(args, **kwargs):  # a supervisor that has opened nothing yet
        started.append(real_popen([sys.executable, "-c", "import time; time.sleep(60)"],
                                  stdin=subprocess.DEVNULL))
        return started[-1]

    monkeypatch.setattr(join_module.subprocess, "Popen", still_starting)
    pid = os.getpid()
    arrival = Arrival(rank=0, world_size=2, name="w0", pid=pid,
                      started=rendezvous_dir.process_started(pid))
    key_dir = str(root / "key")
    try:
        with rendezvous_dir.locked(str(root)):
            record, _, ready_fd, inboxes = join_module._found(
                key_dir, arrival, join_module._member(arrival), 5.0)
    except BaseException:
        for process in started:
            process.kill()
            process.wait()
        raise
    try:
        refused = ArrivalRefused(rank=1, pid=4242, reason="its name is taken")
        with rendezvous_dir.locked(str(root)):
            join_module._tell_refused(os.path.join(key_dir, record.world_id), 2, refused)
        frames = InboxReader(inboxes[2]).read_available()
        assert [(src, wire.decode_control(frame)) for src, frame in frames] == [(1, refused)]
    finally:
        for process in started:
            process.kill()
            process.wait()
        for inbox in inboxes:
            inbox.close()
        os.close(ready_fd)
        with rendezvous_dir.locked(str(root)):
            join_module._remove_locked(key_dir, record)
    assert sorted(p.name for p in root.iterdir()) == ["rendezvous.lock"]


def test_a_good_second_member_joins(founded):
    assert join_elsewhere(1, 3, "trainer") == "joined"


def test_ranks_that_never_arrive_are_named_by_init_rpc(root):
    import localrref
    options = localrref.RpcBackendOptions(init_method="tcp://localhost:29614", init_timeout=1)
    with pytest.raises(RuntimeError, match=r"timed out .* waiting for ranks \[1, 2\]"):
        localrref.init_rpc("lonely", rank=0, world_size=3, rpc_backend_options=options)
    # It left: a later world on the same rendezvous starts afresh.
    record = rendezvous_dir.read_record(str(root / RDV.key.replace("29613", "29614")))
    assert record is None or record.member(0).left


def test_another_host_kept_on_localrref_is_refused_pointing_to_the_hand_over(root, monkeypatch):
    import localrref
    from localrref import api
    options = localrref.RpcBackendOptions(init_method="tcp://192.0.2.1:29615")
    # Left to choose, init_rpc would hand this world over to torch (test_handover).
    assert api._remote_host(options) == "192.0.2.1"
    monkeypatch.setenv("LOCALRREF_BACKEND", "localrref")
    with pytest.raises(NotThisHostError, match="hands the world over to torch.distributed.rpc"):
        localrref.init_rpc("far", rank=0, world_size=2, rpc_backend_options=options)


def test_missing_rank_is_named_as_torch_names_it(root, master, monkeypatch):
    import localrref
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match="environment variable RANK expected, but not set"):
        localrref.init_rpc("x", world_size=2)


def test_no_world_size_says_that_localrref_worlds_are_not_dynamic(root, master, monkeypatch):
    # torch's TensorPipe starts a dynamic world then (its test_dynamic_rpc_*).
    import localrref
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="WORLD_SIZE expected, but not set .* torch.distributed"
                                         ".rpc starts a dynamic world.*have a fixed size"):
        localrref.init_rpc("x", rank=0)


def test_a_rendezvous_directory_of_another_user_is_refused(tmp_path, monkeypatch):
    if os.getuid() != 0:
        pytest.skip("needs root to give a directory to another user")
    foreign = tmp_path / "foreign"
    foreign.mkdir(mode=0o700)
    os.chown(foreign, 65534, 65534)
    monkeypatch.setenv(rendezvous_dir.RUNTIME_DIR_ENV, str(foreign))
    with pytest.raises(rendezvous_dir.RendezvousDirError, match="belongs to uid 65534"):
        join(RDV, rank=0, world_size=2, name="a", shutdown_timeout=5)


def test_a_rendezvous_directory_open_to_others_is_refused(tmp_path, monkeypatch):
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    monkeypatch.setenv(rendezvous_dir.RUNTIME_DIR_ENV, str(open_dir))
    with pytest.raises(rendezvous_dir.RendezvousDirError, match="chmod 700"):
        join(RDV, rank=0, world_size=2, name="a", shutdown_timeout=5)


def test_a_crashed_runs_directory_is_reclaimed(root):
    # What a run whose every process was SIGKILLed leaves: a record naming
    # dead pids, the inboxes, and a segment.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    key_dir = root / RDV.key
    key_dir.mkdir(mode=0o700)
    (key_dir / "0badc0de").mkdir(mode=0o700)
    make_fifos(str(key_dir / "0badc0de"), 3)
    stale = WorldRecord(world_id="0badc0de", world_size=2, supervisor_pid=dead_pid,
                        supervisor_started=1, members=(Member(0, "a", dead_pid, 1),))
    rendezvous_dir.write_record(str(key_dir), stale)
    segment = pathlib.Path("/dev/shm/lrr_0badc0de_0_test")
    segment.write_bytes(b"x")
    try:
        membership = join(RDV, rank=0, world_size=2, name="a", shutdown_timeout=5)
        assert membership.spec.world_id != "0badc0de"
        assert not (key_dir / "0badc0de").exists() and not segment.exists()
        membership.leave(False)
        membership.supervisor.wait(RUN_TIMEOUT)
        assert_nothing_left(root, [membership.spec.world_id])
    finally:
        segment.unlink(missing_ok=True)


def test_sigkill_of_the_supervisor_while_joining_members_wait(root):
    membership = join(RDV, rank=0, world_size=2, name="a", shutdown_timeout=5)
    os.kill(membership.spec.supervisor_pid, signal.SIGKILL)
    membership.supervisor.wait(RUN_TIMEOUT)
    message = join_elsewhere(1, 2, "b")
    assert "lost its supervisor" in message
    membership.leave(False)  # the last member out cleans up in its place
    assert_nothing_left(root, [membership.spec.world_id])


def test_a_founder_whose_supervisor_cannot_start_is_told_why(root, monkeypatch):
    # The founder starts its supervisor and lets others join meanwhile; it
    # confirms the supervisor came up before join returns. Here the
    # "interpreter" exits at once.
    monkeypatch.setattr(sys, "executable", shutil.which("false"))
    with pytest.raises(RuntimeError, match=r"supervisor of the world .* did not start "
                                           r"\(exit code 1\)"):
        join(RDV, rank=0, world_size=2, name="a", shutdown_timeout=5)
    monkeypatch.undo()
    # It left: its supervisor is gone, so it removed the world itself.
    assert sorted(p.name for p in root.iterdir()) == ["rendezvous.lock"]
