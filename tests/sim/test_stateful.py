"""Hypothesis drives the simulator: random programs, shrunk to a minimal failure.

Where tests/sim/test_schedules.py draws whole schedules from one seed, this
machine lets Hypothesis choose every operation, delivery, job and tick, so a
failure shrinks to a short, readable program.
"""

from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from localrref.testing import Faults, SimCall, SimWorld

workers = st.integers(min_value=0, max_value=4)
picks = st.integers(min_value=0, max_value=10_000)


class ProtocolMachine(RuleBasedStateMachine):
    @initialize(n=st.integers(min_value=2, max_value=5), seed=st.integers(0, 2**32 - 1),
                faulty=st.booleans())
    def start(self, n, seed, faulty):
        self.world = SimWorld(n, seed=seed, faults=Faults.all_on(0.25) if faulty else None,
                              faults_name="all" if faulty else "none")

    def _w(self, worker):
        return worker % self.world.n

    def _args(self, worker, pick, count):
        handles = self.world.handles[worker]
        if not handles:
            return []
        return [handles[(pick + i * 7) % len(handles)] for i in range(count)]

    @rule(caller=workers, dst=workers, pick=picks, count=st.integers(0, 3),
          action=st.sampled_from(["store", "store", "fail"]), slow=st.booleans(),
          short=st.booleans())
    def remote(self, caller, dst, pick, count, action, slow, short):
        caller = self._w(caller)
        self.world.op_remote(caller, self._w(dst), self._args(caller, pick, count),
                             SimCall(action, slow), 1.0 if short else 0.0)

    @rule(caller=workers, dst=workers, pick=picks, count=st.integers(0, 3),
          action=st.sampled_from(["echo", "keep", "drop", "fail", "make_local"]),
          slow=st.booleans(), short=st.booleans())
    def rpc(self, caller, dst, pick, count, action, slow, short):
        caller = self._w(caller)
        self.world.op_rpc(caller, self._w(dst), self._args(caller, pick, count),
                          SimCall(action, slow), 1.0 if short else 0.0)

    @rule(caller=workers, pick=picks, short=st.booleans())
    def fetch(self, caller, pick, short):
        caller = self._w(caller)
        users = [h for h in self.world.handles[caller] if not h.is_owner]
        if users:
            self.world.op_fetch(caller, users[pick % len(users)], 1.0 if short else 0.0)

    @rule(worker=workers, pick=picks, count=st.integers(0, 2))
    def create_local(self, worker, pick, count):
        worker = self._w(worker)
        self.world.op_create_local(worker, self._args(worker, pick, count))

    @rule(worker=workers, pick=picks)
    def drop(self, worker, pick):
        worker = self._w(worker)
        if self.world.handles[worker]:
            self.world.op_drop(worker, pick % len(self.world.handles[worker]))

    @precondition(lambda self: self.world._deliverable())
    @rule(pick=picks)
    def deliver(self, pick):
        deliverable = self.world._deliverable()
        self.world.deliver(deliverable[pick % len(deliverable)])

    @precondition(lambda self: self.world._ready_jobs())
    @rule(pick=picks)
    def run_job(self, pick):
        ready = self.world._ready_jobs()
        self.world.run_job(ready[pick % len(ready)])

    @rule(steps=st.integers(1, 20))
    def let_it_run(self, steps):
        for _ in range(steps):
            if not self.world.step():
                break
            self.world.check()

    @invariant()
    def invariants_hold(self):
        self.world.check()

    def teardown(self):
        if hasattr(self, "world"):
            if self.world.seed % 2:
                self.world.check_no_leak()
            else:
                self.world.shutdown()


ProtocolMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestProtocolMachine = ProtocolMachine.TestCase
