"""The auditor on real localrref runs: a clean run is clean, every time."""

import sys

import pytest

import leak_audit

CLEAN_RUN = [sys.executable, "-m", "localrref.launch", "--nproc-per-node", "2", "-m",
             "localrref.examples.parameter_server", "--steps", "20"]


@pytest.mark.processes
@pytest.mark.timeout(120)
def test_a_clean_localrref_run_is_clean():
    report = leak_audit.run_audit(CLEAN_RUN, shm_prefixes=("lrr_",), forward=None)
    assert report.exit_code == 0, report.render()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_twenty_clean_localrref_runs_raise_no_false_alarm():
    for attempt in range(20):
        report = leak_audit.run_audit(CLEAN_RUN, shm_prefixes=("lrr_",), forward=None)
        assert report.exit_code == 0, (attempt, report.render())
