"""Distributed autograd's bookkeeping under thousands of seeded schedules (localrref.testing.autograd_sim)."""

from __future__ import annotations

import pytest

from localrref.core import dist_autograd as da
from localrref.testing.autograd_sim import AutogradSim, InvariantViolation, SimConfig

CONFIGS = {
    "reordered and duplicated": SimConfig(workers=3, rpcs=8),
    "five workers, long chains": SimConfig(workers=5, rpcs=20, duplicate=0.3),
    "passes that raise": SimConfig(workers=4, rpcs=12, fail_pass=0.15),
    "a worker dies": SimConfig(workers=4, rpcs=12, kill=True),
    "late forward calls": SimConfig(workers=3, rpcs=10, late_forward=0.8),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_invariant_holds_on_every_schedule(name):
    config = CONFIGS[name]
    outcomes = {"ok": 0, "failed": 0}
    for seed in range(400):
        sim = AutogradSim(seed, config)
        sim.run()
        outcomes["failed" if sim.done[0].error else "ok"] += 1
    # The schedules exercise both endings where failures are injected.
    if config.fail_pass or config.kill:
        assert outcomes["failed"] > 20 and outcomes["ok"] > 20, outcomes
    else:
        assert outcomes["failed"] == 0, outcomes


def test_gradients_travel_somewhere_on_most_schedules():
    # A simulator whose passes reach nothing would prove nothing.
    counts = []
    for seed in range(200):
        sim = AutogradSim(seed, SimConfig(workers=3, rpcs=8))
        sim.run()
        counts.append(len(sim.applied))
    assert sum(1 for c in counts if c > 0) > 100 and max(counts) >= 4


def test_a_schedule_replays_from_its_seed():
    first, second = AutogradSim(7, CONFIGS["a worker dies"]), AutogradSim(7, CONFIGS["a worker dies"])
    first.run()
    second.run()
    assert first.done == second.done and first.applied == second.applied
    assert first.killed == second.killed


# -- the simulator catches a broken protocol -------------------------------------

def first_failure(config, limit=400):
    for seed in range(limit):
        try:
            AutogradSim(seed, config).run()
        except InvariantViolation as exc:
            return seed, str(exc)
    return None, None


def test_it_catches_duplicates_applied_twice(monkeypatch):
    original = da.AutogradContexts._on_propagate

    def forgetful(self, src, message):
        context = self._contexts.get(message.context_id)
        if context is not None:
            context.running.clear()
            context.answered.clear()
        return original(self, src, message)

    monkeypatch.setattr(da.AutogradContexts, "_on_propagate", forgetful)
    seed, error = first_failure(CONFIGS["reordered and duplicated"])
    assert seed is not None and "applied twice" in error


def test_it_catches_a_context_brought_back_by_a_late_call(monkeypatch):
    monkeypatch.setattr(da.AutogradContexts, "_is_released", lambda self, context_id: False)
    seed, error = first_failure(CONFIGS["late forward calls"])
    assert seed is not None and "still holds context" in error


def test_it_catches_a_cleanup_not_passed_on(monkeypatch):
    original = da.AutogradContexts._release

    def selfish(self, context_id, told_by, quietly=False, informed=()):
        context = self._contexts.get(context_id)
        if context is not None and told_by is not None:
            context.known.clear()
        return original(self, context_id, told_by, quietly, informed)

    monkeypatch.setattr(da.AutogradContexts, "_release", selfish)
    seed, error = first_failure(CONFIGS["five workers, long chains"])
    assert seed is not None and "still holds context" in error


def test_it_catches_a_cleanup_that_claims_to_have_told_everyone(monkeypatch):
    original = da.AutogradContexts._release

    def boastful(self, context_id, told_by, quietly=False, informed=()):
        original(self, context_id, told_by, quietly, informed)
        for i, effect in enumerate(self._effects):
            if isinstance(effect, da.SendMessage) and \
                    isinstance(effect.message, da.CleanupContext):
                self._effects[i] = da.SendMessage(dst=effect.dst, message=da.CleanupContext(
                    context_id=context_id, informed=tuple(range(self.world_size))))

    monkeypatch.setattr(da.AutogradContexts, "_release", boastful)
    seed, error = first_failure(CONFIGS["five workers, long chains"])
    assert seed is not None and "still holds context" in error


def test_it_catches_an_answer_that_does_not_wait_for_downstream(monkeypatch):
    original = da.AutogradContexts.pass_finished

    def hasty(self, pass_id, outgoing=(), error=None):
        original(self, pass_id, outgoing, error)
        current = self._passes.get(pass_id)
        if current is not None and current.reply[0] == "propagation":
            current.outstanding.clear()
            self._finish(current, None)

    monkeypatch.setattr(da.AutogradContexts, "pass_finished", hasty)
    seed, error = first_failure(CONFIGS["five workers, long chains"])
    assert seed is not None and "still to run" in error
