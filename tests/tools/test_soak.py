"""tools/soak.py: its report on synthetic rounds (CI), and a short real soak (slow)."""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import soak
from localrref.testing.programs import run_program

TOOL = Path(__file__).parents[2] / "tools" / "soak.py"


def _points():
    out = []
    for worker in range(3):
        for step in range(20):
            out.append({"source": f"worker{worker}", "step": step, "epoch": step // 10,
                        "t": step * 0.5, "uss": (100 + worker + step % 2) * 2**20,
                        "fds": 30 + step % 3, "threads": 5 + step % 2, "calls": 20,
                        "bytes": 2 << 20})
    return out


def test_the_summary_has_one_row_per_worker_with_its_first_and_last_epoch():
    rows = soak._summary(_points()).splitlines()
    assert len(rows) == 2 + 3
    assert rows[2] == "| worker0 | 20 | 400 | 40 | 100.5 -> 100.5 | 30-32 | 5-6 |"


def test_the_plot_is_an_svg_with_one_line_per_worker(tmp_path):
    path = tmp_path / "soak.svg"
    soak._svg(_points(), str(path), "title")
    root = ET.parse(path).getroot()
    lines = root.findall("{http://www.w3.org/2000/svg}polyline")
    assert len(lines) == 3
    assert all(len(line.get("points").split()) == 20 for line in lines)


def test_fewer_than_three_workers_are_refused(capsys):
    with pytest.raises(SystemExit):
        soak.main(["--workers", "2"])
    assert "at least 3" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.processes
@pytest.mark.timeout(400)
def test_a_short_soak_is_clean(tmp_path):
    # Four epochs (an RPC restart between each), the first a warm-up. Three
    # minutes, not one: in its first minutes a worker's native memory still
    # rises by a few hundred KiB per batch of rounds, about 1.4 KiB per round
    # over one minute (above the auditor's 1 KiB tolerance) and 0.5 KiB per
    # round over three, while Python's objects (py_blocks) stay flat.
    done = run_program([sys.executable, str(TOOL), "--seconds", "180", "--epoch", "45",
                        "--svg", str(tmp_path / "s.svg")],
                       capture_output=True, text=True, timeout=360)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "exit status 0 (clean)" in done.stdout
    assert (tmp_path / "s.svg").exists()
