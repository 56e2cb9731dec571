"""The `difix3d-gs` nerfstudio method, driven through nerfstudio's own commands on the CPU."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import pytest
import torch

BIN = Path(sys.executable).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def run(*command: str | Path) -> str:
    result = subprocess.run([str(part) for part in command], env=ENV, capture_output=True, text=True)
    assert result.returncode == 0, f"{command[0]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def ns_train(scene: Path, output: Path, steps: int, *extra: str | Path) -> Path:
    """Train difix3d-gs with the tiny Difix; returns the run directory."""
    run(
        BIN / "ns-train", "difix3d-gs", "--data", scene, "--output-dir", output, "--experiment-name", "test",
        "--timestamp", "run", "--machine.device-type", "cpu", "--vis", "tensorboard",
        "--max-num-iterations", steps, "--steps-per-eval-image", 10_000, "--steps-per-eval-all-images", 10_000,
        "--pipeline.difix.model", "random-tiny-architecture",
        "--pipeline.progressive.fix-start", 100, "--pipeline.progressive.steps-per-fix", 100,
        # nerfstudio scales scenes into [-1, 1]: a smaller step than the default 0.5 shows the creep.
        "--pipeline.progressive.pose-step", 0.15,
        *extra,
    )
    return output / "test" / "difix3d-gs" / "run"


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "difix3d" / "manifest.json").read_text())


def test_checkpoints_with_numpy_scalars_load_with_weights_only():
    import numpy as np

    import nerfstudio_plugin  # noqa: F401  (installs the allowed globals)

    buffer = io.BytesIO()
    torch.save({"lr": np.float64(1e-3), "lrs": [np.exp(np.float64(-1.0))]}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer)  # weights_only=True, torch's default
    assert loaded["lr"] == 1e-3


def test_nerfstudio_discovers_both_methods():
    """What `ns-train --help` lists: the methods registered through the package's entry points."""
    from nerfstudio.plugins.registry import discover_methods

    methods, descriptions = discover_methods()
    assert {"difix3d-gs", "difix3d-nerfacto"} <= set(methods) and "Difix3D" in descriptions["difix3d-gs"]


def test_splatfacto_optimizers_are_nerfstudios_own_with_our_schedule():
    from nerfstudio.configs.method_configs import method_configs

    from nerfstudio_plugin.config import MAX_STEPS, difix3d_gs, difix3d_nerfacto

    ours, upstream = difix3d_gs.config.optimizers, method_configs["splatfacto"].optimizers
    assert ours.keys() == upstream.keys() and "bilateral_grid" in ours
    for name, group in ours.items():
        assert group["optimizer"] == upstream[name]["optimizer"], name
        if group["scheduler"] is not None:
            assert group["scheduler"].max_steps == MAX_STEPS, name
    assert method_configs["splatfacto"].optimizers["means"]["scheduler"].max_steps == 30_000  # upstream untouched
    assert difix3d_nerfacto.config.optimizers == method_configs["nerfacto"].optimizers


@pytest.mark.slow
def test_bilateral_grid_trains(small_scene: Path, tmp_path: Path):
    run_dir = ns_train(small_scene, tmp_path / "outputs", 3, "--pipeline.model.use-bilateral-grid", "True")
    (checkpoint,) = (run_dir / "nerfstudio_models").iterdir()
    optimizers = torch.load(checkpoint, map_location="cpu", weights_only=False)["optimizers"]
    assert optimizers["bilateral_grid"]["state"], "the bilateral grid was not optimised"


@pytest.fixture(scope="module")
def interrupted_and_resumed(small_scene: Path, tmp_path_factory) -> tuple[Path, Path]:
    """A run stopped after step 150 (one fix round, at 100) and its resume to step 250 (round 200)."""
    outputs = tmp_path_factory.mktemp("runs")
    first = ns_train(small_scene, outputs / "first", 150, "--steps-per-save", 1000)
    # nerfstudio counts --max-num-iterations from the resumed step: steps 150..249.
    resumed = ns_train(small_scene, outputs / "resumed", 100, "--load-dir", first / "nerfstudio_models")
    return first, resumed


@pytest.mark.slow
def test_interrupted_run_resumes_pseudo_views_and_poses(interrupted_and_resumed):
    first, resumed = interrupted_and_resumed
    before, after = manifest(first), manifest(resumed)
    assert len(before["rounds"]) == 1
    assert [round_["step"] for round_ in after["rounds"]] == [100, 200]
    assert after["rounds"][0]["views"] == before["rounds"][0]["views"]
    # Round 200 moved on from round 100's poses (restored), not from the training cameras.
    assert all(
        view["distance"] <= old["distance"] for view, old in zip(after["rounds"][1]["views"], before["rounds"][0]["views"])
    )
    assert any(
        view["distance"] < old["distance"] for view, old in zip(after["rounds"][1]["views"], before["rounds"][0]["views"])
    )


@pytest.mark.slow
def test_train_render_eval(interrupted_and_resumed, small_scene: Path, tmp_path: Path):
    """The resumed run (fix rounds at 100 and 200) through ns-render and ns-eval."""
    run_dir = interrupted_and_resumed[1]
    rounds = manifest(run_dir)["rounds"]
    num_eval = len(list((small_scene / "images").glob("frame_eval_*")))
    assert all(len(round_["views"]) == num_eval for round_ in rounds)
    mean_distance = [sum(view["distance"] for view in r["views"]) / len(r["views"]) for r in rounds]
    assert mean_distance[1] < mean_distance[0]

    renders = tmp_path / "renders"
    run(BIN / "ns-render", "dataset", "--load-config", run_dir / "config.yml", "--split", "test",
        "--rendered-output-names", "rgb", "rgb_enhanced", "--output-path", renders)
    for name in ("rgb", "rgb_enhanced"):
        files = sorted((renders / "test" / name).iterdir())
        assert len(files) == num_eval
        assert all(iio.imread(file).shape[:2] == (60, 80) for file in files)

    metrics_path = tmp_path / "eval.json"
    run(BIN / "ns-eval", "--load-config", run_dir / "config.yml", "--output-path", metrics_path)
    results = json.loads(metrics_path.read_text())["results"]
    for key in ("psnr", "ssim", "psnr_enhanced", "ssim_enhanced"):
        assert math.isfinite(results[key]), key
    # LPIPS where its AlexNet ImageNet weights are present (`make setup` fetches them), else left out.
    from difix3d.imagenet_weights import find_imagenet_weights

    lpips_keys = {"lpips", "lpips_enhanced"}
    if find_imagenet_weights("alex") is None:
        assert not lpips_keys & set(results)
    else:
        assert all(0 <= results[key] < 1 for key in lpips_keys), results


@pytest.mark.slow
def test_pooled_pseudo_view_loss_in_process(small_scene: Path, tmp_path: Path):
    """--pipeline.progressive.pseudo-view-loss-downsample 4: a pseudo view's photometric loss is
    Splatfacto's (L1 and SSIM, weighted) on the masked render and fixed image, both pooled 4x4."""
    import copy

    from difix3d.core.steps import downsample_for_loss
    from nerfstudio_plugin.config import difix3d_gs

    config = copy.deepcopy(difix3d_gs.config)
    config.data = config.pipeline.datamanager.data = small_scene
    config.output_dir, config.machine.device_type, config.vis = tmp_path, "cpu", "tensorboard"
    config.pipeline.model.num_downscales = 0
    config.pipeline.difix.model = "random-tiny-architecture"
    progressive = config.pipeline.progressive
    progressive.fix_start, progressive.pseudo_view_prob, progressive.pseudo_view_loss_downsample = 0, 1.0, 4
    config.set_timestamp()
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    pipeline, model = trainer.pipeline, trainer.pipeline.model
    pipeline.fix_round_if_due(0)

    camera, batch = pipeline.datamanager.next_train(1)
    assert batch["loss_downsample"] == 4 and batch["loss_weight"] == 0.3
    model.eval()  # a training-mode render steps the densification strategy, whose optimizers the trainer owns
    with torch.no_grad():
        outputs = model.get_outputs(camera)
        pooled = model.get_loss_dict(outputs, batch)["main_loss"]
        per_pixel = model.get_loss_dict(outputs, {**batch, "loss_downsample": 1})["main_loss"]
    mask = batch["mask"]
    render, image = (downsample_for_loss(x * mask, 4) for x in (outputs["rgb"], batch["image"].float() / 255))
    assert render.shape == (15, 20, 3)
    ssim = model.ssim(image.permute(2, 0, 1)[None], render.permute(2, 0, 1)[None])
    expected = 0.3 * (0.8 * (image - render).abs().mean() + 0.2 * (1 - ssim))
    torch.testing.assert_close(pooled, expected)
    assert not torch.isclose(pooled, per_pixel)
