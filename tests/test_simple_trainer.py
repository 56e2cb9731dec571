"""The plain gsplat trainer with Difix3D (scripts/simple_trainer_difix3d.py), driven by its CLI on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "simple_trainer_difix3d.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def trainer(scene: Path, result_dir: Path, steps: int, *extra: str) -> str:
    command = [
        sys.executable, SCRIPT, "--data-dir", scene, "--result-dir", result_dir, "--max-steps", steps,
        "--difix", "random-tiny-architecture", "--progressive.fix-start", 20, "--progressive.steps-per-fix", 20,
        "--strategy.refine-start-iter", 10, "--strategy.refine-every", 15, "--save-every", 1000, *extra,
    ]
    result = subprocess.run([str(part) for part in command], env=ENV, capture_output=True, text=True)
    assert result.returncode == 0, f"trainer failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


@pytest.mark.slow
def test_fix_rounds_eval_and_resume(tiny_scene: Path, tmp_path: Path):
    results = tmp_path / "results"
    output = trainer(tiny_scene, results, 50)
    assert "Difix3D round 0 at step 20" in output and "Difix3D round 1 at step 40" in output
    assert "eval step 50: PSNR" in output and "Difix3D+: PSNR" in output
    metrics = json.loads((results / "stats" / "eval_step_000050.json").read_text())
    assert all(metrics[key] == metrics[key] for key in ("psnr", "ssim", "psnr_enhanced", "ssim_enhanced"))  # not NaN

    # Resuming continues from the step-50 checkpoint (Gaussians densified since the start) and
    # moves the pseudo views on from round 1's poses.
    # (With the pooled pseudo-view loss from here on: the trainer's pooling path runs too.)
    output = trainer(tiny_scene, results, 70, "--resume", "--progressive.pseudo-view-loss-downsample", "2")
    assert "resumed from ckpt_000050_rank0.pt at step 50" in output
    assert "Difix3D round 2 at step 60" in output and "eval step 70: PSNR" in output
    manifest = json.loads((results / "difix3d" / "manifest.json").read_text())
    assert [round_["step"] for round_ in manifest["rounds"]] == [20, 40, 60]
    distances = [[view["distance"] for view in round_["views"]] for round_ in manifest["rounds"]]
    assert all(new <= old + 1e-6 for new, old in zip(distances[2], distances[1]))
