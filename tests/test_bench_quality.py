"""Smoke test of scripts/bench_quality.py: the whole chain at toy size (its numbers mean nothing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_quality.py"
METHODS = ("3dgs", "difix3d", "difix3d+", "difix_on_3dgs")


@pytest.mark.slow
def test_quick_run_writes_every_report_and_resumes(tmp_path: Path):
    results, work = tmp_path / "results", tmp_path / "work"
    command = [sys.executable, str(SCRIPT), "--quick", "--work", str(work), "--results", str(results), "--ship", str(tmp_path / "shipped")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    first = subprocess.run(command, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]

    report = json.loads((results / "quality.json").read_text())
    assert set(report["summary"]["methods"]) == set(METHODS)
    scene = report["scenes"][0]
    assert set(scene["per_view"]) == set(METHODS) and len(scene["per_view"]["3dgs"]) == 8
    assert 0 < scene["train_view_psnr_3dgs"] < 100
    assert [r["step"] for r in scene["rounds"]] == [20, 40]
    assert "| Difix3D+ |" in (results / "quality.md").read_text()
    assert iio.imread(results / "quality_grid.png").shape[1] == 4 * (80 + 4)  # GT | 3DGS | Difix3D | Difix3D+
    assert (results / "quality_rounds.png").stat().st_size > 0

    from difix3d.checkpoint import load_difix

    load_difix(tmp_path / "shipped")  # the shipped folder loads
    assert "Benchmark" in (tmp_path / "shipped" / "README.md").read_text()

    # Every stage is on disk now: a second run only rebuilds the report.
    second = subprocess.run(command, env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "plain 3DGS" not in second.stderr and "pretraining" not in second.stderr
