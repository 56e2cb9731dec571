"""scripts/bench_quality.py at toy size (its numbers mean nothing): every report, the baselines-only
mode and reusing its stages, repeatable Difix stages, and refusing stages made by other code."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_quality.py"
METHODS = ("3dgs", "difix3d", "difix3d+", "difix_on_3dgs")


def bench(*arguments, work: Path, results: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, str(SCRIPT), "--quick", "--work", str(work), "--results", str(results), *map(str, arguments)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, env=env, capture_output=True, text=True)


def scores(results: Path) -> dict:
    report = json.loads((results / "quality.json").read_text())
    return {"methods": report["summary"]["methods"], "scenes": [(s["per_view"], s["plain_seeds"], s["train_views"]) for s in report["scenes"]]}


@pytest.mark.slow
def test_quick_benchmark_reports_resumes_repeats_and_refuses_other_code(tmp_path: Path):
    work, results = tmp_path / "work", tmp_path / "results"
    # The Difix-independent stages first (as while a Difix trains), then a Difix reuses them.
    baselines = bench("--baselines-only", work=work, results=results)
    assert baselines.returncode == 0, baselines.stderr[-3000:]
    assert not results.exists()
    card = tmp_path / "card" / "README.md"
    card.parent.mkdir()
    card.write_text("# A model\n\n## Benchmark\n\nold numbers\n\n## Training\n\nkept\n")
    first = bench("--difix", "random-tiny-architecture", "--model-card", card, work=work, results=results)
    assert first.returncode == 0, first.stderr[-3000:]

    report = json.loads((results / "quality.json").read_text())
    ran = report["timing"]["stages_run_now"]
    assert ran and all("/difix-random-tiny-architecture-" in name for name in ran), ran
    summary = report["summary"]
    assert set(summary["methods"]) == set(METHODS)
    assert {"mean", "std"} <= set(summary["methods"]["difix3d+"]["psnr"])
    assert "lpips" in summary["methods"]["3dgs"]  # a {mean, std} or None with the reason below
    assert summary["lpips"]["available"] == (summary["methods"]["3dgs"]["lpips"] is not None)
    assert summary["lpips"]["available"] or "AlexNet" in summary["lpips"]["reason"]
    assert report["code"]["current"]["commit"] and len(report["code"]["stages"]) == 1
    machine = report["machine"]["current"]
    assert machine["cores"] >= 1 and machine["cpu"] and [m["machine"] for m in report["machine"]["stages"]] == [machine]
    assert set(summary["paired_differences"]) == {"difix3d - 3dgs", "difix3d+ - 3dgs", "difix_on_3dgs - 3dgs", "difix3d+ - difix3d"}
    assert "within_noise" in summary["paired_differences"]["difix3d - 3dgs"]["psnr"]
    assert summary["noise_floor"]["seeds"] == [0, 1] and summary["noise_floor"]["seed_std"]["psnr"] > 0
    assert "psnr_cost" in summary["difix_on_training_views"]
    scene = report["scenes"][0]
    assert set(scene["per_view"]) == set(METHODS) and len(scene["per_view"]["3dgs"]) == 8
    # Difix3D is the plain seed-0 run up to its first fix round, and only up to it.
    assert summary["paired_runs_identical_before_first_round"] and [r["step"] for r in scene["rounds"]] == [20, 40]
    assert scene["per_view"]["difix3d"] != scene["per_view"]["3dgs"]
    markdown = (results / "quality.md").read_text()
    assert report["code"]["current"]["commit"][:12] in markdown and "| Difix3D+ |" in markdown
    assert f"Machine: `{machine['cpu']}, {machine['cores']} cores" in markdown
    assert iio.imread(results / "quality_grid.png").shape[1] == 5 * (80 + 4)  # GT | 3DGS | Difix3D | Difix3D+ | Difix on 3DGS
    assert (results / "quality_rounds.png").stat().st_size > 0
    written = card.read_text()
    assert "old numbers" not in written and "| Difix3D+ |" in written and written.count("## Benchmark") == 1
    assert "## Training\n\nkept" in written

    # A stage from other code is refused, unless asked for; the Difix stages, run again then, give
    # the same numbers (one run checks both: each benchmark run starts nerfstudio four times).
    scene_dir = work / "eval" / "eval_1000"
    record_path = scene_dir / "plain_seed1" / "stage.json"
    record = json.loads(record_path.read_text())
    record["code"] = {"commit": "0" * 40, "dirty": False, "code_hash": "another-code"}
    record["machine"] = {"cpu": "Another CPU", "cores": 64, "system": "Linux", "torch": "0"}
    record_path.write_text(json.dumps(record))
    refused = bench("--difix", "random-tiny-architecture", work=work, results=tmp_path / "results_mixed")
    assert refused.returncode != 0 and "other code" in refused.stderr and "Traceback" not in refused.stderr
    for folder in scene_dir.glob("difix-*"):
        shutil.rmtree(folder)
    mixed = bench("--difix", "random-tiny-architecture", "--allow-mixed-code", "--model-card", card,
                  work=work, results=tmp_path / "results_mixed")
    assert mixed.returncode == 0, mixed.stderr[-3000:]
    again = json.loads((tmp_path / "results_mixed" / "quality.json").read_text())
    versions = again["code"]["stages"]
    assert {version["commit"] for version in versions} == {"0" * 40, report["code"]["current"]["commit"]}
    mixed_markdown = (tmp_path / "results_mixed" / "quality.md").read_text()
    assert "000000000000" in mixed_markdown
    assert len(again["machine"]["stages"]) == 2 and "stages from 2 machines: " in mixed_markdown and "Another CPU, 64 cores" in mixed_markdown
    ran = again["timing"]["stages_run_now"]
    assert any(name.endswith("/difix3d") for name in ran) and not any("plain_seed" in name for name in ran)
    assert scores(tmp_path / "results_mixed") == scores(results)
    rewritten = card.read_text()  # the whole benchmark section replaced, nothing of the first run's left
    assert rewritten.count("## Benchmark") == 1 and rewritten.count("### Results") == 1 and "## Training\n\nkept" in rewritten
