"""`make demo`'s hand-off to the user (issue 14 case 13), with the long runs replaced by their files."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import imageio.v3 as iio
import numpy as np

from script_modules import load_script

ROOT = Path(__file__).resolve().parents[1]


def test_demo_ends_with_the_run_and_the_next_commands(tmp_path, monkeypatch, capsys):
    demo = load_script("demo")
    output = tmp_path / "demo_output"
    scene = output / "scene"
    (scene / "sparse" / "0").mkdir(parents=True)
    (scene / "images").mkdir()
    (scene / "ground_truth.json").write_text(json.dumps({"seed": demo.Demo(output=output).seed}))
    iio.imwrite(scene / "images" / "frame_eval_0000.png", np.full((30, 40, 3), 90, dtype=np.uint8))

    def fake_train_render_eval(settings, scene_dir, name, *method_args):
        for output_name in ("rgb", "rgb_enhanced"):
            folder = output / "renders" / name / "test" / output_name
            folder.mkdir(parents=True, exist_ok=True)
            iio.imwrite(folder / "frame_eval_0000.jpg", np.full((30, 40, 3), 160, dtype=np.uint8))
        run = output / "runs" / name / "difix3d-gs" / "run"
        (run / "difix3d").mkdir(parents=True, exist_ok=True)
        (run / "difix3d" / "manifest.json").write_text(json.dumps({"rounds": []}))
        return {"psnr": 20.0, "ssim": 0.5, "psnr_enhanced": 21.0, "ssim_enhanced": 0.6}

    monkeypatch.setattr(demo, "train_render_eval", fake_train_render_eval)
    scores = {"psnr": {"mean": 15.5}, "ssim": {"mean": 0.6}, "lpips": {"mean": 0.2}}
    benchmark = tmp_path / "quality.json"
    scene_means = {method: {"psnr": 17.25, "ssim": 0.625, "lpips": 0.25} for method in ("3dgs", "difix3d", "difix3d+")}
    benchmark.write_text(json.dumps({
        "difix": {"spec": "embedded"}, "code": {"current": {"commit": "a" * 40}},
        "scenes": [{"scene": f"eval_{seed}", "mean": scene_means} for seed in range(1000, 1006)],
        "summary": {"methods": {method: scores for method in ("3dgs", "difix3d", "difix3d+")}, "noise_floor": {"seeds": [0, 1, 2]}},
    }))  # fmt: skip
    demo.main(demo.Demo(output=output, benchmark=benchmark))
    printed = capsys.readouterr().out
    assert "The benchmark's means over 6 held-out scenes" in printed and "aaaaaaaaaaaa" in printed
    assert "Difix3D+     15.50  0.6000  0.2000" in printed
    # The demo's runs are the benchmark's seed-0 runs of its scene: that scene's row is shown too.
    assert f"This scene in the benchmark (eval_{demo.Demo(output=output).seed}, the same runs; " in printed and "a few tenths of a dB" in printed
    assert "Difix3D+     17.25  0.6250  0.2500" in printed
    config = output / "runs" / "difix3d" / "difix3d-gs" / "run" / "config.yml"
    assert f"The Difix3D run: {config}" in printed
    assert f"ns-render dataset --load-config {config}" in printed
    assert f"ns-viewer --load-config {config}" in printed
    assert f"ns-train difix3d-gs --data {scene} --machine.device-type cpu --pipeline.difix.model " in printed

    comparison = iio.imread(output / "comparison.png")
    assert comparison.shape[1] == 4 * 40 and comparison.shape[0] > 30
    labels = comparison[: comparison.shape[0] - 30]
    for column in range(4):  # every column has its label drawn above it
        assert (labels[:, column * 40 : (column + 1) * 40] < 128).any(), column


def test_readme_commands_leave_git_status_clean():
    if not (ROOT / ".git").exists():
        return
    written = ["data/room/images/a.png", "output.json", "renders/test/rgb/a.jpg", "outputs/x/config.yml"]
    result = subprocess.run(["git", "check-ignore", *written], cwd=ROOT, capture_output=True, text=True)
    assert result.stdout.split() == written


def test_demo_rebuilds_a_scene_left_with_another_seed(tmp_path, monkeypatch):
    demo = load_script("demo")
    scene = tmp_path / "scene"
    (scene / "sparse" / "0").mkdir(parents=True)
    (scene / "ground_truth.json").write_text(json.dumps({"seed": 7}))
    assert demo.scene_seed(scene) == 7 and demo.scene_seed(tmp_path / "missing") is None
    commands = []

    def stop_after_the_scene(command):
        commands.append([str(part) for part in command])
        raise SystemExit

    monkeypatch.setattr(demo, "run", stop_after_the_scene)
    settings = demo.Demo(output=tmp_path)
    try:
        demo.main(settings)
    except SystemExit:
        pass
    assert commands[0][1:] == ["scene", "--out", str(scene), "--seed", str(settings.seed), "--overwrite"]
