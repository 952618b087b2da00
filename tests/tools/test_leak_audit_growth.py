"""Growth detection: the fit rule on synthetic series, and measure_growth in this process."""

from __future__ import annotations

import os
import random
import sys
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import leak_audit
from leak_audit import LeakFound, LeakKind, fit_growth, measure_growth, parse_probe_line


@pytest.fixture(autouse=True)
def nothing_left_behind():
    with leak_audit.Audit(shm_prefixes=("la_growth_none_",)) as audit:
        yield
    audit.report().raise_if_leaking()


def series(values, step=10):
    return [(i * step, v) for i, v in enumerate(values)]


# -- fit_growth -----------------------------------------------------------------------------


def test_one_object_per_step_is_a_leak():
    fit = fit_growth(series([100 + 10 * i for i in range(6)]), source="s", metric="fds")
    assert fit.verdict == "leak"
    assert fit.slope == pytest.approx(1.0)
    assert fit.kind is LeakKind.FD_GROWTH


def test_flat_series_is_clean():
    fit = fit_growth(series([7] * 6), source="s", metric="threads")
    assert (fit.verdict, fit.slope, fit.kind) == ("clean", 0.0, LeakKind.THREAD_GROWTH)


def test_one_off_jump_is_noise_not_a_leak():
    # A pool filling up once (or an arena allocated once): big slope, one batch.
    fit = fit_growth(series([5, 5, 5, 25, 25, 25]), source="s", metric="threads")
    assert fit.slope > 0
    assert fit.verdict == "noisy"
    assert "4 of 5 batches did not grow" in fit.note


def test_memory_grows_in_pages_so_sub_page_batches_are_not_growth():
    # +1 page now and then is the allocator, not a leak, whatever the slope.
    fit = fit_growth(series([0, 4096, 4096, 8192, 8192, 12288], step=1), source="s",
                     metric="uss", tolerance=10.0)
    assert fit.verdict == "noisy"


def test_steady_memory_growth_over_tolerance_is_a_leak():
    values = [50_000_000 + 65536 * i + (4096 if i % 2 else 0) for i in range(0, 300, 10)]
    fit = fit_growth(series(values, step=10), source="s", metric="uss")
    assert fit.verdict == "leak"
    assert fit.slope == pytest.approx(65536, rel=0.05)


def test_growth_below_memory_tolerance_is_clean():
    fit = fit_growth(series([1000 * i * 10 for i in range(11)]), source="s", metric="uss",
                     tolerance=2000)
    assert fit.verdict == "clean"


def test_warmup_points_are_dropped():
    values = [0, 50, 90, 100, 100, 100, 100, 100, 100]  # a cache filling, then flat
    assert fit_growth(series(values), source="s", metric="py_blocks").verdict != "leak"
    fit = fit_growth(series(values), source="s", metric="py_blocks", warmup=3)
    assert (fit.verdict, fit.points) == ("clean", 6)


def test_too_few_points_is_insufficient_not_clean():
    fit = fit_growth(series([1, 2, 3]), source="s", metric="fds", batches=5)
    assert fit.verdict == "insufficient"
    assert "need 6 points" in fit.note


def test_metric_names_pick_the_leak_kind():
    assert leak_audit._growth.kind_of("w1.fds") is LeakKind.FD_GROWTH
    assert leak_audit._growth.kind_of("threads") is LeakKind.THREAD_GROWTH
    assert leak_audit._growth.kind_of("live_rrefs") is LeakKind.LEAKED_RREF
    assert leak_audit._growth.kind_of("rref.num_forks") is LeakKind.LEAKED_RREF
    assert leak_audit._growth.kind_of("uss") is LeakKind.MEMORY_GROWTH
    assert leak_audit._growth.kind_of("py_blocks") is LeakKind.MEMORY_GROWTH


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=6, max_size=80), st.integers(0, 1000))
def test_bounded_count_noise_is_never_a_leak(noise, base):
    # Every batch must gain >= 1, so a count that wanders within a range narrower
    # than the number of batches (5) can never be called a leak.
    fit = fit_growth(series([base + n for n in noise], step=1), source="s", metric="fds")
    assert fit.verdict != "leak"


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 3), st.lists(st.integers(-2, 2), min_size=30, max_size=30))
def test_steady_count_leak_with_small_noise_is_always_caught(per_step, noise):
    values = [per_step * 10 * i + n for i, n in enumerate(noise)]  # 10 steps between points
    fit = fit_growth(series(values), source="s", metric="fds")
    assert fit.verdict == "leak"


def test_random_object_churn_is_not_a_leak_over_many_seeds():
    # py_blocks of a program that keeps 0..60 random objects alive between steps.
    for seed in range(200):
        rng = random.Random(seed)
        values = [10_000 + rng.randint(0, 60) for _ in range(51)]
        fit = fit_growth(series(values, step=1), source="s", metric="py_blocks")
        assert fit.verdict != "leak", (seed, fit.describe())


# -- probe lines ----------------------------------------------------------------------------


def test_probe_line_round_trips_with_this_process_numbers():
    point = parse_probe_line(leak_audit.probe_line(3, live_rrefs=2))
    assert point.step == 3 and point.source == f"pid {os.getpid()}"
    assert point.metrics["live_rrefs"] == 2
    assert point.metrics["fds"] > 0 and point.metrics["uss"] > 0
    assert point.metrics["py_blocks"] > 0 and point.metrics["threads"] >= 1


def test_parse_probe_line_ignores_other_lines_and_names_malformed_ones():
    assert parse_probe_line("hello LEAK_AUDIT_STEP {}") is None
    point = parse_probe_line('LEAK_AUDIT_STEP {"step": 1, "source": "w1", "x": 2, "ok": true}')
    assert (point.source, dict(point.metrics)) == ("w1", {"x": 2.0})
    with pytest.raises(ValueError, match="not JSON"):
        parse_probe_line("LEAK_AUDIT_STEP {oops")
    with pytest.raises(ValueError, match='numeric "step"'):
        parse_probe_line('LEAK_AUDIT_STEP {"uss": 1}')


# -- measure_growth -------------------------------------------------------------------------


def test_leaking_one_object_per_step_is_caught():
    kept = []
    report = measure_growth(lambda: kept.append(object()), warmup=10, times=20)
    (leak,) = report.leaks
    assert leak.metric == "py_blocks" and leak.slope == pytest.approx(1.0, abs=0.05)
    with pytest.raises(LeakFound, match="py_blocks"):
        report.raise_if_leaking()


def test_allocator_churn_is_not_a_leak():
    rng = random.Random(0)
    holder = []

    def step():
        holder[:] = [bytearray(rng.randint(1, 50_000)) for _ in range(rng.randint(0, 20))]
        {str(i): [i] * 3 for i in range(rng.randint(0, 200))}

    for _ in range(3):
        report = measure_growth(step, warmup=10, times=20)
        assert report.leaks == (), report.render()


def test_fd_and_thread_leaks_are_caught_and_named():
    files, threads, release = [], [], threading.Event()

    def step():
        files.append(open(os.devnull, "rb"))
        t = threading.Thread(target=release.wait, daemon=True)
        t.start()
        threads.append(t)

    try:
        report = measure_growth(step, warmup=2, times=4, batches=4, retries=0)
    finally:
        release.set()
        for t in threads:
            t.join()
        for f in files:
            f.close()
    kinds = {v.kind: v.status for v in report.verdicts}
    assert kinds[LeakKind.FD_GROWTH] is leak_audit.Status.LEAK
    assert kinds[LeakKind.THREAD_GROWTH] is leak_audit.Status.LEAK
    slopes = {m.metric: m.slope for m in report.leaks}
    assert slopes["fds"] == pytest.approx(1.0) and slopes["threads"] == pytest.approx(1.0)


def test_live_rrefs_from_a_callback_are_judged_as_rref_leaks():
    registry = []
    report = measure_growth(lambda: registry.append(1), include_self=False, warmup=0, times=3,
                            probes={"live_rrefs": lambda: len(registry)})
    (verdict,) = report.verdicts
    assert (verdict.kind, verdict.status) == (LeakKind.LEAKED_RREF, leak_audit.Status.LEAK)
    steady = measure_growth(lambda: None, include_self=False, warmup=0, times=3,
                            probes={"live_rrefs": lambda: len(registry)})
    assert steady.leaks == ()


def test_one_callback_can_report_many_numbers_of_a_worker():
    state = {"w1.uss": 1e8, "w1.fds": 10}

    def step():
        state["w1.fds"] += 1

    report = measure_growth(step, include_self=False, warmup=0, times=2, probes=lambda: state)
    assert [m.metric for m in report.leaks] == ["w1.fds"]


def test_one_off_growth_triggers_a_retry_and_is_then_cleared():
    calls, hoard = [0], []

    def step():
        calls[0] += 1
        if calls[0] == 30:  # once, mid-way through the first round: a cache fill
            hoard.extend(object() for _ in range(500))

    report = measure_growth(step, include_self=False, warmup=0, times=10, batches=5,
                            probes={"objects": lambda: len(hoard)})
    assert report.rounds == 2 and report.times == 20
    assert report.leaks == ()
    assert report.metrics[0].verdict == "clean"


def test_measure_growth_rejects_bad_arguments():
    with pytest.raises(ValueError, match="times >= 1"):
        measure_growth(lambda: None, times=0)
    with pytest.raises(ValueError, match="nothing to measure"):
        measure_growth(lambda: None, include_self=False)


def test_process_probes_read_another_process():
    probes = leak_audit.process_probes(os.getppid())
    assert probes["fds"]() >= 0 and probes["threads"]() >= 1 and probes["uss"]() > 0


def test_debug_info_probes_need_localrref(monkeypatch):
    monkeypatch.setitem(sys.modules, "localrref", type(sys)("localrref"))
    with pytest.raises(RuntimeError, match="get_debug_info"):
        leak_audit.debug_info_probes()
    fake = type(sys)("localrref")
    fake.get_debug_info = lambda: {"num_owner_rrefs": "3", "num_forks": "1"}
    monkeypatch.setitem(sys.modules, "localrref", fake)
    probes = leak_audit.debug_info_probes()
    assert probes["rref.num_owner_rrefs"]() == 3.0 and probes["rref.num_pending_users"]() == 0.0


def test_growth_that_dies_down_is_a_warm_up_not_a_leak():
    # USS of a worker still importing and initialising: every batch grows, less and less.
    values = [0, 30_000_000, 44_000_000, 58_000_000, 59_700_000, 59_780_000]
    fit = fit_growth(series(values), source="s", metric="uss")
    assert fit.verdict == "noisy" and "dying down" in fit.note
