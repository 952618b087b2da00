"""tools/timeline.py and tools/bench_apps.py: a real run records a timeline in every
worker, the files merge into one, and the printout starts where asked.

Like the bench smoke tests, this checks the harness, never how fast anything was.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path

import psutil
import pytest

import timeline
from localrref.testing.programs import run_program

REPO = Path(__file__).resolve().parents[2]
BENCH_APPS = REPO / "tools" / "bench_apps.py"


def _events():
    # (ns, rank, thread, kind, detail), in time order, as load() gives them
    return [
        (1_000, 1, 0, "T>", "trainer:_step@0"),
        (2_000, 1, 0, "W>", "0:49@0"),
        (2_500, 0, 0, "P<", "@1"),
        (4_000, 1, 0, "T>", "trainer:_step@0"),
        (9_000, 1, 0, "T>", "trainer:_step@1"),
    ]


def test_render_starts_at_the_chosen_phase_start_and_shows_gaps_and_ranks():
    text = timeline.render(_events(), phase="trainer: step", rank=1, first=0, steps=1)
    lines = text.splitlines()
    assert len(lines) == 3  # up to the next start of the phase
    assert lines[0].split()[0] == "0.0" and "rank1/t0 T> trainer:_step@0" in lines[0]
    assert "+1.0" in lines[1] and "rank1/t0 W> 0:49@0" in lines[1]
    assert "+0.5" in lines[2] and "rank0/t0 P< @1" in lines[2]
    # Columns: rank 1's lines sit one column to the right of rank 0's.
    assert lines[1].index("rank1") - lines[2].index("rank0") == 30
    last = timeline.render(_events(), phase="trainer: step", rank=1, first=2, steps=5)
    assert last.splitlines()[0].split()[0] == "0.0" and len(last.splitlines()) == 1


def test_render_names_the_phases_there_are_when_asked_for_too_many():
    with pytest.raises(SystemExit, match=r"starts 3 times on rank 1.*trainer: step"):
        timeline.render(_events(), phase="trainer: step", rank=1, first=3, steps=1)


def _wake_events():
    # rank 1 waits twice; rank 0 writes to it during the first wait, between
    # the waits and during the second, and rank 2 writes during the second too.
    events = [
        (1_000, 1, 0, "P>", "@1"),
        (2_000, 0, 0, "W>", "1:41:blob@0"),
        (2_100, 0, 0, "W<", "@0"),
        (5_000, 1, 0, "P<", "@0"),
        (6_000, 0, 0, "W>", "1:41:PythonCall@0"),
        (6_050, 0, 0, "W<", "@0"),
        (7_000, 1, 0, "P>", "@1"),
        (7_100, 0, 0, "W>", "1:20:RRefAck@1"),
        (7_200, 0, 0, "W<", "@1"),
        (7_150, 2, 3, "W>", "1:20:RRefAck@0"),
        (57_150, 2, 3, "W<", "@0"),
        (407_100, 1, 0, "P<", "@0"),
    ]
    return sorted(events)


def test_wakes_are_the_writes_that_found_their_reader_waiting():
    found = timeline.wakes(_wake_events())
    by_start = sorted(found, key=lambda w: (w.src, w.latency_us))
    assert [(w.src, w.dst) for w in by_start] == [(0, 1), (0, 1), (2, 1)]
    first, second, third = by_start
    # From the start of the write to the end of the reader's wait; the write
    # made while rank 1 was busy (at 6 us) woke nobody and is not counted.
    assert first.latency_us == 3.0 and first.write_us == 0.1 and first.same_cpu
    assert second.latency_us == 400.0 and not second.same_cpu
    assert third.latency_us == 399.95 and third.write_us == 50.0 and third.same_cpu


def test_wake_ups_are_summed_up_by_writer_and_reader_with_their_stalls():
    rows = timeline.summarize_wakes(timeline.wakes(_wake_events()), stall_us=300)
    assert [(r.src, r.dst, r.wakes) for r in rows] == [(0, 1, 2), (2, 1, 1), (None, None, 3)]
    everything = rows[-1]
    assert everything.max_us == 400.0 and everything.median_us == 399.95
    # Two took longer than 300 us, 800 us between them; two woke where the write began.
    assert everything.stalls == 2 and round(everything.stalled_ms, 3) == 0.8
    assert everything.same_cpu == 2
    assert rows[0].write_median_us == 0.1 and rows[1].write_p90_us == 50.0
    table = timeline.render_wakes(timeline.wakes(_wake_events()), stall_us=300)
    assert "over 300 us" in table.splitlines()[0]
    assert table.splitlines()[-1].split()[:2] == ["all", "3"]
    assert timeline.render_wakes([]) == "no write found its reader waiting"


def test_the_stall_cost_splits_a_phases_steps_by_whether_a_wake_up_stalled_in_them():
    ms = 1_000_000
    # Steps 1 and 3 last 4 ms, having a wake-up of 500 us; the rest 2 ms,
    # one of them with a quick wake-up.
    starts = [0, 2, 6, 8, 12, 14]
    steps = [(at * ms, 0, 0, "T>", "ps:_step@0") for at in starts]
    found = [timeline.Wake(src=0, dst=1, at_ns=3 * ms, latency_us=500.0, write_us=10.0,
                           same_cpu=True),
             timeline.Wake(src=1, dst=0, at_ns=9 * ms, latency_us=600.0, write_us=10.0,
                           same_cpu=False),
             timeline.Wake(src=1, dst=0, at_ns=1 * ms, latency_us=40.0, write_us=10.0,
                           same_cpu=False)]
    cost = timeline.stall_cost(steps, found, phase="ps: step", rank=0, stall_us=300)
    assert (cost.steps, cost.stalled) == (5, 2)
    assert cost.stalled_median_ms == 4.0 and cost.others_median_ms == 2.0
    assert cost.share == (8 - 2 * 2) / 14  # 4 of the 14 ms would be saved
    # A phase another rank runs, or too few steps of a kind: nothing to compare.
    assert timeline.stall_cost(steps, found, phase="ps: step", rank=1) is None
    assert timeline.stall_cost(steps, found[2:], phase="ps: step", rank=0) is None


def test_events_are_recorded_only_while_recording():
    timeline.event("X>")  # not recording: dropped
    timeline.start()
    try:
        timeline.event("Y>", "detail")
    finally:
        timeline.stop()
    timeline.event("Z>")
    recorded = [(kind, detail) for _, _, kind, detail, _ in timeline._events]
    assert recorded == [("Y>", "detail")]


def test_frames_are_described_by_peer_size_and_kind_when_written(tmp_path):
    from localrref.codec import frames
    from localrref.core.messages import PythonCall
    from localrref.transport import wire

    call = frames.encode_message(PythonCall(request_id=7, payload=b"x"))
    sent = timeline._Frame(2, wire.pack(0, call), sent=True)
    received = timeline._Frame(0, memoryview(call), sent=False)
    blob = timeline._Frame(1, wire.pack_blob(0, b"h" * 30), sent=True)
    autograd = timeline._Frame(1, wire.AUTOGRAD_TAG + b"...", sent=False)
    assert str(sent) == str(received).replace("0:", "2:", 1) == f"2:{len(call)}:PythonCall"
    assert str(blob) == "1:30:blob"
    # A frame read out of shared memory: its start names its class.
    big = frames.encode_message(PythonCall(request_id=8, payload=b"x" * 10_000))
    assert str(timeline._Frame(1, big, sent=False)) == f"1:{len(big)}:PythonCall"
    assert str(autograd) == "1:4:autograd"
    timeline.start()
    try:
        timeline.event("W>", sent)
    finally:
        timeline.stop()
    path = tmp_path / "new" / "rank0.txt"  # the directory is made
    timeline.write(str(path))
    assert f"W> 2:{len(call)}:PythonCall@" in path.read_text()


@pytest.mark.processes
@pytest.mark.timeout(120)
def test_a_real_run_writes_a_timeline_per_rank_that_merges_and_prints(tmp_path):
    token = uuid.uuid4().hex
    directory = tmp_path / "timeline"
    directory.mkdir()
    out = tmp_path / "apps.json"
    proc = run_program(
        [sys.executable, str(BENCH_APPS), "--apps", "ps", "--world-sizes", "3",
         "--backends", "localrref", "--scale", "0.02", "--json", str(out)],
        cwd=REPO, env={**os.environ, "BENCH_APPS_TIMELINE": str(directory),
                       "BENCH_SMOKE_TOKEN": token},
        capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(out.read_text())["rows"][0]
    assert row["app"] == "ps" and row["localrref"]["steps_per_s"] > 0

    assert sorted(p.name for p in directory.iterdir()) == ["rank0.txt", "rank1.txt",
                                                           "rank2.txt"]
    events = timeline.load(str(directory))
    assert [e[0] for e in events] == sorted(e[0] for e in events)
    for rank in range(3):
        kinds = {kind for _, r, _, kind, _ in events if r == rank}
        # Every worker sent and received frames; the server ran the trainers' calls.
        assert {"W>", "W<", "R>", "R<", "P>", "P<"} <= kinds, (rank, kinds)
    assert {"J>", "J<", "T>"} <= {kind for _, r, _, kind, _ in events if r == 0}
    text = timeline.render(events, phase="trainer: forward and backward", rank=1, first=1,
                           steps=1)
    assert "trainer:_forward_and_backward" in text.splitlines()[0]
    assert any("rank0/" in line and " J> " in line for line in text.splitlines())
    # Each trainer waits for its reply, and the first call of every round
    # finds the server waiting: writes both ways found their reader waiting.
    pairs = {(w.src, w.dst) for w in timeline.wakes(events)}
    assert {(0, 1), (0, 2)} <= pairs and pairs & {(1, 0), (2, 0)}, pairs
    assert all(w.latency_us > 0 for w in timeline.wakes(events))

    _, alive = psutil.wait_procs(
        [p for p in psutil.process_iter() if _has_token(p, token)], timeout=5)
    assert not alive, f"bench_apps left processes behind: {alive}"


def _has_token(proc: psutil.Process, token: str) -> bool:
    try:
        return proc.environ().get("BENCH_SMOKE_TOKEN") == token
    except (psutil.Error, OSError):
        return False
