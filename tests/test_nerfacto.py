"""The `difix3d-nerfacto` nerfstudio method on the CPU: fix rounds, rgb_enhanced, ns-eval, resume."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import imageio.v3 as iio
import pytest

BIN = Path(sys.executable).parent
METHOD = "difix3d-nerfacto"


def environment() -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if METHOD not in entry_points(group="nerfstudio.method_configs").names:  # a checkout not (re)installed
        env["NERFSTUDIO_METHOD_CONFIGS"] = f"{METHOD}=nerfstudio_plugin.config:difix3d_nerfacto"
    return env


def run(*command: str | Path) -> str:
    result = subprocess.run([str(part) for part in command], env=environment(), capture_output=True, text=True)
    assert result.returncode == 0, f"{command[0]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def ns_train(scene: Path, output: Path, steps: int, *extra: str | Path) -> Path:
    output_text = run(
        BIN / "ns-train", METHOD, "--data", scene, "--output-dir", output, "--experiment-name", "test",
        "--timestamp", "run", "--machine.device-type", "cpu", "--vis", "tensorboard",
        "--max-num-iterations", steps, "--steps-per-eval-image", 10_000, "--steps-per-eval-batch", 10_000,
        "--steps-per-eval-all-images", 10_000, "--steps-per-save", 1000,
        # Fewer rays and samples than nerfacto's defaults: its hash grid runs in plain PyTorch on the CPU.
        "--pipeline.datamanager.train-num-rays-per-batch", 256,
        "--pipeline.model.num-proposal-samples-per-ray", 32, 16, "--pipeline.model.num-nerf-samples-per-ray", 8,
        "--pipeline.model.num-levels", 8, "--pipeline.model.max-res", 256,
        "--pipeline.model.eval-num-rays-per-chunk", 4096,
        "--pipeline.difix.model", "random-tiny-architecture",
        "--pipeline.progressive.fix-start", 20, "--pipeline.progressive.steps-per-fix", 10,
        "--pipeline.progressive.pose-step", 0.15,
        *extra,
    )
    if "--load-dir" in extra:
        assert "Difix3D: resumed 1 rounds" in output_text
    return output / "test" / METHOD / "run"


def rounds(run_dir: Path) -> list:
    """The manifest's rounds, each round's folder resolved (the manifest stores it relative to itself)."""
    manifest = run_dir / "difix3d" / "manifest.json"
    found = json.loads(manifest.read_text())["rounds"]
    return [{**round_, "directory": str((manifest.parent / round_["directory"]).resolve())} for round_ in found]


@pytest.mark.slow
def test_nerfacto_rounds_render_eval_and_resume(small_scene: Path, tmp_path: Path):
    run_dir = ns_train(small_scene, tmp_path / "first", 25)
    num_eval = len(list((small_scene / "images").glob("frame_eval_*")))
    assert [round_["step"] for round_ in rounds(run_dir)] == [20]
    assert len(rounds(run_dir)[0]["views"]) == num_eval

    renders = tmp_path / "renders"
    run(BIN / "ns-render", "dataset", "--load-config", run_dir / "config.yml", "--split", "test",
        "--rendered-output-names", "rgb", "rgb_enhanced", "--output-path", renders)
    for name in ("rgb", "rgb_enhanced"):
        files = sorted((renders / "test" / name).iterdir())
        assert len(files) == num_eval and iio.imread(files[0]).shape[:2] == (60, 80)

    metrics_path = tmp_path / "eval.json"
    run(BIN / "ns-eval", "--load-config", run_dir / "config.yml", "--output-path", metrics_path)
    results = json.loads(metrics_path.read_text())["results"]
    for key in ("psnr", "ssim", "psnr_enhanced", "ssim_enhanced"):
        assert math.isfinite(results[key]), key

    # Resumed at step 25 (nerfstudio counts --max-num-iterations from there): the round and its
    # pseudo views come back (a round renders every target, so none is due before step 30 here;
    # rounds after a resume are checked with difix3d-gs, which shares this pipeline code).
    resumed = ns_train(small_scene, tmp_path / "resumed", 3, "--load-dir", run_dir / "nerfstudio_models")
    assert rounds(resumed) == rounds(run_dir)


@pytest.mark.slow
def test_pseudo_view_ray_batch_in_process(small_scene: Path, tmp_path: Path):
    """A pseudo-view batch: rays of one pseudo view, inside its mask, with the 0.3 loss weight."""
    import copy

    import torch

    from nerfstudio_plugin.config import difix3d_nerfacto

    config = copy.deepcopy(difix3d_nerfacto.config)
    config.data = config.pipeline.datamanager.data = small_scene
    config.output_dir, config.machine.device_type, config.vis = tmp_path, "cpu", "tensorboard"
    config.pipeline.datamanager.train_num_rays_per_batch = 64
    model = config.pipeline.model
    model.num_proposal_samples_per_ray, model.num_nerf_samples_per_ray = (16, 8), 8
    model.num_levels, model.max_res, model.eval_num_rays_per_chunk = 4, 64, 8192
    config.pipeline.difix.model = "random-tiny-architecture"
    config.pipeline.progressive.fix_start, config.pipeline.progressive.pseudo_view_prob = 0, 1.0
    config.set_timestamp()
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    pipeline = trainer.pipeline
    pipeline.fix_round_if_due(0)

    rays, batch = pipeline.datamanager.next_train(1)
    assert rays.shape == (64,) and batch["image"].shape == (64, 3) and batch["loss_weight"] == 0.3
    camera, rows, columns = batch["indices"].unbind(-1)
    masks = [pipeline.update.updater.load_pseudo_view(i)[1] for i in range(len(pipeline.update.updater.pseudo_views))]
    assert any(bool(mask[rows, columns].all()) for mask in masks)  # every ray inside one view's mask
    outputs = pipeline.model(rays)
    weighted = pipeline.model.get_loss_dict(outputs, batch, pipeline.model.get_metrics_dict(outputs, batch))["rgb_loss"]
    plain = pipeline.model.get_loss_dict(outputs, {k: v for k, v in batch.items() if k != "loss_weight"},
                                         pipeline.model.get_metrics_dict(outputs, batch))["rgb_loss"]
    torch.testing.assert_close(weighted, plain * 0.3)


def test_model_is_nerfactos_own_without_torchmetrics_lpips():
    """populate_modules sets up nerfacto's modules itself (torchmetrics' LPIPS downloads AlexNet): the
    same submodules, parameters and seeded initial weights as nerfstudio's NerfactoModel."""
    from unittest import mock

    import torch
    from nerfstudio.data.scene_box import SceneBox
    from nerfstudio.models.nerfacto import NerfactoModelConfig

    from difix3d.metrics import LPIPSMetric
    from nerfstudio_plugin.nerfacto import Difix3DNerfactoModelConfig

    small = {"log2_hashmap_size": 10, "num_levels": 4, "proposal_net_args_list": [
        {"hidden_dim": 8, "log2_hashmap_size": 8, "num_levels": 2, "max_res": 64, "use_linear": False}] * 2}

    def build(config):
        torch.manual_seed(0)
        return config.setup(scene_box=SceneBox(aabb=torch.tensor([[-1.0, -1, -1], [1, 1, 1]])), num_train_data=4, metadata={})

    ours = build(Difix3DNerfactoModelConfig(**small))
    # nerfstudio's own, with torchmetrics' LPIPS stubbed here (in the test) so it builds offline.
    with mock.patch("torchmetrics.image.lpip.LearnedPerceptualImagePatchSimilarity", lambda **kwargs: None):
        theirs = build(NerfactoModelConfig(**small))
    assert isinstance(ours.lpips, LPIPSMetric) and "lpips" not in ours._modules

    def submodules(model):
        return [(name, type(module)) for name, module in model.named_modules() if name]

    assert submodules(ours) == submodules(theirs)
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    assert ours_state.keys() == theirs_state.keys()
    assert all(torch.equal(ours_state[key], theirs_state[key]) for key in ours_state)
    assert len(ours.density_fns) == len(theirs.density_fns) and ours.proposal_sampler.update_sched(50) == theirs.proposal_sampler.update_sched(50)


def test_pooled_pseudo_view_loss_is_refused_on_rays():
    import copy

    from difix3d.errors import Difix3DError
    from nerfstudio_plugin.config import difix3d_nerfacto
    from nerfstudio_plugin.pipeline import Difix3DNerfactoPipeline

    config = copy.deepcopy(difix3d_nerfacto.config.pipeline)
    config.progressive.pseudo_view_loss_downsample = 2
    with pytest.raises(Difix3DError, match="difix3d-nerfacto trains on rays.*pseudo-view-loss-downsample at 1"):
        Difix3DNerfactoPipeline(config, "cpu")
