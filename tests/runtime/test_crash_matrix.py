"""The crash matrix: a worker SIGKILLed at each step of each protocol exchange.

One world of three workers per cell (``crash_cells.py``): rank 0 the caller,
rank 1 the owner, rank 2 a third worker that gets a fork. The victim kills
itself at the cell's point (fault injection's ``kill_on``). In every cell
the affected call fails with an error naming the victim (no call has a
timeout: only the death notice can end it), calls among the survivors keep
working, the survivors' tables end empty (nothing kept for the dead, every
delete acknowledged), the survivors' ``shutdown()`` fails naming the victim,
and nothing is left behind: process, thread, file descriptor or /dev/shm
segment (the ``leak_free`` audit, and the world's own segments).

The supervisor's death is covered where the supervisor is its own process:
tests/launch/test_launch_spawn.py (the workers go down with it) and
tests/launch/test_rendezvous_worlds.py (calls go on, shutdown fails naming it).
Exceptions at each stage of a call: test_world.py's
test_exceptions_at_every_stage_of_a_call_fail_only_that_call.

CI runs five cells (about 3 s each: three workers start); ``-m slow`` adds
the other victims and steps.
"""

from __future__ import annotations

import multiprocessing

import pytest
from torch.multiprocessing.spawn import ProcessExitedException

import crash_cells
import localrref
from localrref.transport.shm import world_segments

pytestmark = [pytest.mark.processes, pytest.mark.timeout(150)]

CALLER, OWNER, THIRD = 0, 1, 2
NAMES = {CALLER: "caller", OWNER: "owner", THIRD: "third"}

# (step, victim, kill_on, in CI)
CELLS = [
    ("call", OWNER, "recv:PYTHON_CALL", True),
    ("call", CALLER, "send:PYTHON_CALL", False),
    ("remote", OWNER, "recv:PYTHON_REMOTE_CALL", False),
    ("remote", CALLER, "send:PYTHON_REMOTE_CALL", True),
    ("fork request", OWNER, "recv:RREF_FORK_REQUEST", False),
    ("fork request", THIRD, "send:RREF_FORK_REQUEST", True),
    ("child accept", THIRD, "recv:RREF_ACK", False),
    # The reply to the call that carried the fork is the child's accept
    # (no RREF_CHILD_ACCEPT for a fork passed in a request).
    ("child accept", CALLER, "recv:PYTHON_RET", False),
    ("to_here", OWNER, "recv:PYTHON_RREF_FETCH_CALL", False),
    ("to_here", CALLER, "send:PYTHON_RREF_FETCH_CALL", False),
    ("user delete", OWNER, "recv:RREF_USER_DELETE", False),
    ("user delete", CALLER, "send:RREF_USER_DELETE", False),
    ("copy", CALLER, "copy", True),
    ("copy", OWNER, "copy", False),
    ("reader runs the victim's function", OWNER, "", False),
    ("shutdown: arriving", OWNER, "send:ShutdownArrived", False),
    ("shutdown: draining", OWNER, "send:ShutdownDrained", False),
    ("shutdown: reporting", OWNER, "send:ShutdownDone", False),
    ("shutdown: deleting", OWNER, "recv:RREF_USER_DELETE", True),
    ("shutdown: finishing", OWNER, "send:ShutdownFinished", False),
]


def _params():
    for step, victim, kill_on, in_ci in CELLS:
        marks = () if in_ci else (pytest.mark.slow,)
        yield pytest.param(step, victim, kill_on, marks=marks,
                           id=f"{step}-{NAMES[victim]}-dies".replace(" ", "_").replace(":", ""))


@pytest.mark.parametrize("step, victim, kill_on", list(_params()))
def test_a_worker_killed_at_this_step(step, victim, kill_on, leak_free):
    cell = {"step": step, "victim": victim, "kill_on": kill_on}
    mp = multiprocessing.get_context("spawn")
    results, arrived = mp.SimpleQueue(), mp.SimpleQueue()
    # One start queue per worker: a queue's get holds a lock shared by every
    # process that reads it, and the victim may die inside its get (its
    # reader can receive the killing message before its main thread returns
    # from the get), which would block the others' gets for ever.
    go = [mp.SimpleQueue() for _ in range(3)]
    try:
        context = localrref.spawn(crash_cells.worker, args=(cell, results, arrived, go),
                                  nprocs=3, join=False)
        # A barrier: every worker's init_rpc returned before any step starts.
        for _ in range(3):
            arrived.get()
        for queue in go:
            queue.put(True)
        with pytest.raises(ProcessExitedException) as info:
            context.join(grace_period=60)
        reports = {}
        while not results.empty():
            report = results.get()
            reports[report["rank"]] = report
    finally:
        for queue in (results, arrived, *go):
            queue.close()
    assert info.value.error_index == victim and "SIGKILL" in str(info.value), str(info.value)
    survivors = sorted(set(range(3)) - {victim})
    assert sorted(reports) == survivors, reports
    victim_name = f"worker{victim}"
    for rank in survivors:
        report = reports[rank]
        assert "driver error" not in report, report
        if step == "shutdown: finishing":
            # It died after its last shutdown message: the world had shut
            # down by then.
            assert report["shutdown"] == "ok", report
        else:
            # Graceful shutdown cannot succeed with a worker dead: it fails
            # at once, naming it.
            assert f"rank {victim}" in report["shutdown"] and "Error" in report["shutdown"], \
                report
    if not step.startswith("shutdown"):
        driver = reports[2 if victim == CALLER else 0]
        if victim != CALLER:
            failed = driver["failed"]
            assert failed["error"] is not None, f"{step}: the call did not fail: {driver}"
            assert victim_name in failed["error"] or f"rank {victim}" in failed["error"], failed
        assert driver["survivor call"] == 2
        for key in ("owner tables", "my tables"):
            if key in driver:
                assert set(driver[key].values()) == {0}, (key, driver)
        if step == "child accept" and victim == CALLER:
            assert driver["held"] == [[0, 1, 2, 3]]  # the child's fork outlives its parent
    assert world_segments(reports[survivors[0]]["world"]) == []
