"""The simulator is only worth its invariants if it catches a broken protocol.

Each test breaks one rule of the seed in the real core (monkeypatched for the
test only) and demands that random schedules catch it, with a seed that
replays the failure.
"""

import pytest

from localrref.core.rref_context import RRefContext
from localrref.testing import InvariantViolation, run_schedule


def first_failing_seed(limit=400, profile="all"):
    for seed in range(limit):
        try:
            run_schedule(seed, profile)
        except InvariantViolation as exc:
            return seed, str(exc)
    return None, None


def break_early_fork_registration(self, rref):
    # The owner no longer registers a child's fork before sending it.
    original_add = self.add_fork_of_owner
    if rref.is_owner:
        self.add_fork_of_owner = lambda rref_id, fork_id: None
    try:
        return ORIGINAL_PREPARE(self, rref)
    finally:
        self.add_fork_of_owner = original_add


def break_pending_child_hold(self, fork_id, rref):
    # The parent user no longer keeps itself alive for its child.
    return None


def break_del_fork_of_owner_idempotency(self, rref_id, fork_id):
    forks = self.forks.get(rref_id)
    if forks is None or fork_id not in forks:
        raise KeyError(f"delete of unknown fork {fork_id} of {rref_id}")
    return ORIGINAL_DEL_FORK(self, rref_id, fork_id)


def new_job_without_argument_holds(self, *args, **kwargs):
    job = ORIGINAL_NEW_JOB(self, *args, **kwargs)
    for rref in job.rrefs:
        if not rref.is_owner:
            rref.holds -= 1
    return job


def start_job_taking_argument_holds(self, job):
    # A job holds its argument RRefs only once it starts: the first of two
    # arguments to be confirmed is deleted while the job still waits for the
    # second (the bug behind "UserRRef ... was deleted; it cannot be fetched").
    for rref in job.rrefs:
        if not rref.is_owner:
            rref.holds += 1
    return ORIGINAL_START_JOB(self, job)


ORIGINAL_PREPARE = RRefContext.prepare_child_fork
ORIGINAL_DEL_FORK = RRefContext.del_fork_of_owner
ORIGINAL_NEW_JOB = RRefContext._new_job
ORIGINAL_START_JOB = RRefContext._start_job

MUTATIONS = {
    "early_fork_registration": {"prepare_child_fork": break_early_fork_registration},
    "pending_child_hold": {"add_pending_child": break_pending_child_hold},
    "del_fork_of_owner_idempotency": {"del_fork_of_owner": break_del_fork_of_owner_idempotency},
    "job_argument_holds_from_arrival": {"_new_job": new_job_without_argument_holds,
                                        "_start_job": start_job_taking_argument_holds},
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_simulation_catches_mutation(mutation, monkeypatch):
    for name, broken in MUTATIONS[mutation].items():
        monkeypatch.setattr(RRefContext, name, broken)
    seed, text = first_failing_seed()
    assert seed is not None, f"no schedule caught the broken {mutation}"
    assert f"seed={seed}" in text and f"--replay {seed}" in text
    monkeypatch.undo()
    run_schedule(seed, "all")  # the same schedule passes with the real core
