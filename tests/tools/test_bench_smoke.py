"""tools/bench.py: option parsing and report shape in-process, plus one tiny real run per backend.

The real run is a smoke test of the harness, not a measurement: it checks that every
selected row produced a value, that the RRef tables drained and that tensors kept
value semantics -- never how fast anything was (speed belongs to the benchmark itself).
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path

import psutil
import pytest

import bench
import bench_workloads as wl
from localrref.testing.programs import run_program

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "tools" / "bench.py"


# --- in-process: parsing, iteration plans, report rendering ----------------------------------

def test_parse_size_accepts_suffixes_and_rejects_garbage():
    assert bench.parse_size("4K") == 4096
    assert bench.parse_size("16MB") == 16 << 20
    assert bench.parse_size("4096") == 4096
    with pytest.raises(Exception, match="cannot read size"):
        bench.parse_size("lots")


@pytest.mark.parametrize("argv, message", [
    (["--backends", "mpi"], "unknown backend 'mpi'"),
    (["--rows", "sync,latency"], "unknown row group 'latency'"),
])
def test_cli_names_the_bad_choice(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.build_parser().parse_args(argv)
    assert message in capsys.readouterr().err


def test_rows_aliases_expand_in_order_without_duplicates():
    assert bench.parse_groups("tensor,tensor_arg,sync") == ("tensor_return", "tensor_arg", "sync")


def test_quick_drops_sizes_above_16mb_and_scale_keeps_floors():
    cfg = bench.config_from_args(bench.build_parser().parse_args(["--quick", "--scale", "0.001"]))
    assert sorted(cfg.iters.tensor) == [4 << 10, 1 << 20, 16 << 20]
    assert cfg.worlds == 1
    assert cfg.iters.sync >= 20 and cfg.iters.async_calls >= cfg.iters.async_window
    assert min(cfg.iters.tensor.values()) >= 3


def test_percentile_is_nearest_rank():
    samples = [float(x) for x in range(1, 101)]
    assert wl.percentile(samples, 50) == 50.0
    assert wl.percentile(samples, 99) == 99.0
    assert wl.percentile([7.0], 99) == 7.0


def _fake_results(scale: float) -> dict:
    return {
        "sync": {"p50_us": 100.0 * scale, "p99_us": 300.0 * scale},
        "fork": {"ops_per_s": 1000.0 / scale, "drained": scale < 1, "drain_ms": 5.0,
                 "tables": {"owner.num_owner_rrefs": 0 if scale < 1 else 3}},
        "tensor_arg": {"error": "RuntimeError: boom"},
    }


def test_report_gives_ratio_localrref_over_torch_and_flags_failures():
    cfg = bench.config_from_args(bench.build_parser().parse_args(
        ["--rows", "sync,fork,tensor_arg", "--sizes", "4K"]))
    results = {"torch": _fake_results(1.0), "localrref": _fake_results(0.5)}
    rows = {row.key: row for row in bench.build_rows(cfg)}
    assert bench.ratio(bench.cell(rows["sync_p50"], results["localrref"]),
                       bench.cell(rows["sync_p50"], results["torch"])) == 0.5
    assert bench.cell(rows["fork_drained"], results["localrref"]) == "yes"
    assert bench.cell(rows["fork_drained"], results["torch"]).startswith("no (")
    assert bench.cell(rows["tensor_arg_4096"], results["torch"]) == "error: RuntimeError: boom"

    meta = {"command": "python tools/bench.py --rows sync", "nproc": 2, "cpu_model": "CPU X",
            "platform": "Linux x86_64", "python": "3.11", "torch": "2.13.0",
            "tp_transports": "torch default", "tp_channels": "torch default", "worlds": 3}
    md = bench.render_markdown(list(rows.values()), results, meta)
    assert "`python tools/bench.py --rows sync`" in md and "2 CPUs (CPU X)" in md
    sync_line = next(line for line in md.splitlines() if "latency p50" in line)
    assert sync_line == "| rpc_sync no-op latency p50 (us) | lower | 100 | 50.0 | 0.50× |"


def test_big_tensor_rows_are_also_shown_against_one_memcpy_of_the_same_run():
    cfg = bench.config_from_args(bench.build_parser().parse_args(
        ["--rows", "tensor_return", "--sizes", "4K,64M"]))
    rows = {row.key: row for row in bench.build_rows(cfg)}
    big = 64 << 20
    assert "tensor_return_4096_per_memcpy" not in rows  # small sizes: no memcpy row
    per_memcpy = rows[f"tensor_return_{big}_per_memcpy"]
    result = {"tensor_return": {"p50_ms": {str(big): 6.0}, "memcpy_ms": {str(big): 4.0}}}
    assert bench.cell(per_memcpy, result) == 1.5
    assert bench.cell(per_memcpy, {"tensor_return": {"p50_ms": {str(big): 6.0}}}) is None


def test_repeated_runs_merge_to_medians_joined_lists_and_all():
    runs = [
        {"sync": {"p50_us": 100.0}, "fork": {"drained": True, "tables": {"n": 0}},
         "world": {"4": {"start_ms": [1.0, 2.0], "errors": []}}, "note": "first"},
        {"sync": {"p50_us": 300.0}, "fork": {"drained": False, "tables": {"n": 2}},
         "world": {"4": {"start_ms": [3.0], "errors": ["boom"]}}, "note": "second"},
        {"sync": {"p50_us": 200.0}, "fork": {"drained": True, "tables": {"n": 1}}},
    ]
    merged = bench.merge_runs(runs)
    assert merged["sync"]["p50_us"] == 200.0
    assert merged["fork"] == {"drained": False, "tables": {"n": 1}}
    assert merged["world"]["4"] == {"start_ms": [1.0, 2.0, 3.0], "errors": ["boom"]}
    assert merged["note"] == "first"
    assert bench.merge_runs([runs[0]]) is runs[0]
    with pytest.raises(SystemExit):
        bench.config_from_args(bench.build_parser().parse_args(["--repeat", "0"]))


# --- a real run through the CLI ----------------------------------------------------------------

def _backend_param(name: str):
    problem = bench.backend_problem(name)
    return pytest.param(name, marks=pytest.mark.skipif(problem is not None,
                                                       reason=f"{name}: {problem}"))


def _processes_with_token(token: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("BENCH_SMOKE_TOKEN") == token:
                found.append(proc)
        except (psutil.Error, OSError):
            continue  # gone, or not ours to read
    return found


@pytest.mark.processes
@pytest.mark.timeout(90)
@pytest.mark.parametrize("backend", [_backend_param("torch"), _backend_param("localrref")])
def test_tiny_run_fills_every_row_and_leaves_nothing_behind(backend, tmp_path):
    token = uuid.uuid4().hex
    out = tmp_path / "bench.json"
    proc = run_program(
        [sys.executable, str(BENCH), "--backends", backend,
         "--rows", "sync,fork,tensor_return,tensor_arg", "--sizes", "4K,1M",
         "--scale", "0.02", "--watchdog", "60", "--json", str(out)],
        cwd=REPO, env={**os.environ, "BENCH_SMOKE_TOKEN": token},
        capture_output=True, text=True, timeout=80)
    assert proc.returncode == 0, proc.stderr[-3000:]

    report = json.loads(out.read_text())
    values = {row["key"]: row["values"][backend] for row in report["rows"]}
    assert set(values) >= {"sync_p50", "sync_p99", "fork_ops", "fork_drained",
                           "tensor_return_4096", "tensor_arg_1048576"}
    for key, value in values.items():
        if key.endswith(("_drained", "_independent")):
            assert value == "yes", (key, value, proc.stderr[-3000:])
        else:
            assert isinstance(value, float) and value > 0, (key, value, proc.stderr[-3000:])
    assert report["meta"]["nproc"] == os.cpu_count()

    # Processes are matched by a token in their environment, so other test runs on the same
    # machine cannot confuse the check. /dev/shm is not checked here for the same reason (no
    # name there says who made it); tools/leak_audit.py covers localrref's own segments.
    leftovers = _processes_with_token(token)
    # A worker still exiting after the launcher returned gets a short grace, then fails the test.
    _, alive = psutil.wait_procs(leftovers, timeout=5)
    assert not alive, f"bench left processes behind: {alive}"


def _start_row_values(tmp_path, group: str, **env: str) -> dict:
    """Run one 2-worker world of ``group`` for localrref; its rows' values, once
    every process of the run is gone."""
    token = uuid.uuid4().hex
    out = tmp_path / "bench.json"
    proc = run_program(
        [sys.executable, str(BENCH), "--backends", "localrref", "--rows", group,
         "--world-sizes", "2", "--worlds", "1", "--watchdog", "60", "--json", str(out)],
        cwd=REPO, env={**os.environ, "BENCH_SMOKE_TOKEN": token, **env},
        capture_output=True, text=True, timeout=80)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    _, alive = psutil.wait_procs(_processes_with_token(token), timeout=5)
    assert not alive, f"bench left processes behind: {alive}"
    return {row["key"]: row["values"]["localrref"] for row in report["rows"]}


@pytest.mark.processes
@pytest.mark.timeout(90)
def test_forkserver_start_rows_fill_and_the_server_goes_with_the_run(tmp_path):
    values = _start_row_values(tmp_path, "world_forkserver")  # the forkserver is gone too
    assert isinstance(values["world_fs_start_2"], float) and values["world_fs_start_2"] > 0


@pytest.mark.processes
@pytest.mark.timeout(90)
def test_runner_start_rows_run_the_torch_workers_on_localrref(tmp_path):
    # The workers run the torch backend's code (import torch.distributed.rpc,
    # TensorPipe options) under python -m localrref.run: the world must form
    # on localrref, through a rendezvous under this test's own root.
    root = tmp_path / "rt"
    root.mkdir(mode=0o700)
    values = _start_row_values(tmp_path, "world_runner", LOCALRREF_RUNTIME_DIR=str(root))
    assert isinstance(values["world_run_start_2"], float) and values["world_run_start_2"] > 0
    assert sorted(p.name for p in root.iterdir()) == ["rendezvous.lock"]
