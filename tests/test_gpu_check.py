"""The prepared GPU check (`scripts/gpu_check.sh`): its plumbing, run here on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from script_modules import load_script

ROOT = Path(__file__).resolve().parent.parent


def test_part_over_its_cap_is_killed_and_keeps_its_output(tmp_path) -> None:
    gpu_check = load_script("gpu_check")
    command = [sys.executable, "-c", "import time; print('{\"row\": 1}', flush=True); time.sleep(60)"]
    part = gpu_check.Part("slow", command, cap_s=2, parse=gpu_check.json_lines)
    with (tmp_path / "log").open("w") as log:
        result = gpu_check.run_part(part, deadline=float("inf"), build_status=None, scratch=tmp_path, env=dict(os.environ), log=log)
    assert result["status"] == "timeout" and result["results"] == [{"row": 1}]
    assert result["seconds"] < 30
    with (tmp_path / "log").open("w") as log:
        import time

        skipped = gpu_check.run_part(part, deadline=time.monotonic() + 5, build_status=None, scratch=tmp_path, env={}, log=log)
        needs_build = gpu_check.Part("raster", command, cap_s=2, parse=str, needs_gsplat=True)
        no_build = gpu_check.run_part(needs_build, float("inf"), build_status="timeout", scratch=tmp_path, env={}, log=log)
    assert skipped["status"] == "skipped" and "budget" in skipped["reason"]
    assert no_build["status"] == "skipped" and "gsplat build timeout" in no_build["reason"]
    assert gpu_check.last_json_object('noise\n{\n  "a": {"b": 1}\n}\n') == {"a": {"b": 1}}


@pytest.mark.slow
def test_dry_run_runs_every_part_and_writes_one_json(tmp_path) -> None:
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path), "GPU_WHEELS": str(tmp_path / "no-wheels"),
           "GPU_CHECK_SITE": str(tmp_path / "site")}
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"], env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["check"] == "scripts/gpu_check.sh --dry-run" and report["versions"]["diffusers"]
    assert report["gsplat_build"]["status"] == "ok"
    parts = report["parts"]
    assert parts.keys() == {
        "cuda_tests", "difix_latency", "difix_latency_compiled", "train_memory", "train_memory_no_checkpointing", "rasterizer",
    }
    assert parts.pop("difix_latency_compiled")["status"] == "skipped"  # compiling takes far too long on a CPU
    assert {name: part["status"] for name, part in parts.items()} == dict.fromkeys(parts, "ok")
    assert [(row["refs"], row["compiled"]) for row in parts["difix_latency"]["results"]] == [(1, False), (0, False)]
    assert parts["train_memory"]["results"]["gradient_checkpointing"] is True
    assert parts["train_memory_no_checkpointing"]["results"]["gradient_checkpointing"] is False
    assert parts["rasterizer"]["results"]["configs"]
    counts = parts["cuda_tests"]["results"]["counts"]
    assert counts.get("skipped", 0) >= 1 and set(counts) == {"skipped"}  # no GPU here: collected, then skipped
    assert "===== rasterizer" in (tmp_path / "gpu_check.log").read_text()
