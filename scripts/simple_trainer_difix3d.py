"""Difix3D+ on a plain gsplat trainer, without nerfstudio.

One readable file in the manner of gsplat's `examples/simple_trainer.py`: a COLMAP scene in
(`images/` + `sparse/0/`, pinhole cameras), 3D Gaussians rendered by `difix3d.rendering.rasterize.rasterization`
(gsplat's CUDA kernels on a GPU, the project's PyTorch rasterizer on the CPU), densified by gsplat's
`DefaultStrategy`, with the Difix3D fix rounds and the Difix3D+ enhancer of `difix3d.core.steps`.
Evaluation reports PSNR / SSIM / LPIPS of the renders and of the enhanced renders on the held-out
views (frames named `*eval*`, else every `test_every`-th image), which are also the fix rounds'
targets. Checkpoints (`<result_dir>/ckpts/`) hold everything needed to resume exactly (`--resume`).

    python scripts/simple_trainer_difix3d.py --data-dir scene --result-dir results/scene
    CUDA_VISIBLE_DEVICES=0,1 python scripts/simple_trainer_difix3d.py --data-dir scene --distributed

Library use: `from simple_trainer_difix3d import Config, train; metrics = train(Config(data_dir=...))`.
With `--distributed` and several GPUs it runs gsplat's multi-GPU mode: one process per GPU, each
holding a share of the Gaussians and training on its own views (`rasterization(distributed=True)`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import imageio.v3 as iio
import numpy as np
import pycolmap
import torch
import tqdm
import tyro
from gsplat.strategy import DefaultStrategy

from difix3d.core.poses import to_homogeneous
from difix3d.core.progressive import ProgressiveConfig, select_targets
from difix3d.core.steps import Difix3DUpdate, Enhancer, EnhancerConfig, downsample_for_loss
from difix3d.data.sfm import camera_to_world
from difix3d.devices import DtypeName, resolve_device, resolve_dtype
from difix3d.errors import Difix3DError
from difix3d.images import from_uint8, to_uint8
from difix3d.metrics import LPIPSMetric, psnr, ssim
from difix3d.models.ids import DEFAULT_BASE
from difix3d.rendering.gaussians import params_from_points, render_splats, splat_optimizers
from difix3d.runtime import configure_cpu_runtime



@dataclass
class Config:
    data_dir: Path
    """COLMAP scene: `images/` and `sparse/0/` (pinhole or simple-pinhole cameras)."""
    result_dir: Path = Path("results/difix3d")
    """Checkpoints, pseudo views (`difix3d/`), evaluation renders and metrics."""
    test_every: int = 8
    """When no image name contains "eval": every test_every-th image is held out."""
    max_steps: int = 60_000
    eval_steps: tuple[int, ...] = ()
    """Steps after which to evaluate (besides the last)."""
    save_every: int = 5000
    """Checkpoint every this many steps (besides after each fix round and at the end)."""
    keep_checkpoints: int = 2
    """Older checkpoints are deleted once newer ones exist."""
    resume: bool = False
    """Continue from the latest checkpoint in `result_dir/ckpts`."""
    seed: int = 0
    device: str = "auto"
    cpu_threads: int = 1
    """PyTorch threads on the CPU (0: PyTorch's default); splatting small images prefers one."""
    distributed: bool = False
    """On CUDA with several GPUs: gsplat's multi-GPU mode, one process per visible GPU."""

    # Gaussians
    sh_degree: int = 3
    sh_degree_interval: int = 1000
    """Raise the SH degree by one every this many steps."""
    init_opacity: float = 0.1
    init_scale: float = 1.0
    random_init_points: int = 100_000
    """Random initial Gaussians when the SfM model has no 3D points."""
    ssim_lambda: float = 0.2
    packed: bool = False
    strategy: DefaultStrategy = field(default_factory=lambda: DefaultStrategy(verbose=False))

    # Difix3D
    difix: str = "nvidia/difix_ref"
    """A hub id, a folder written by `difix3d`, a reference-release `.pkl`, or `random-tiny-architecture` (random, tests only)."""
    base: str = DEFAULT_BASE
    """The SD-Turbo a reference-release `.pkl` is applied on."""
    difix_dtype: DtypeName = "auto"
    difix_offload: bool = False
    """Keep Difix on the CPU between fix rounds (saves GPU memory)."""
    enabled: bool = True
    """False trains plain 3DGS: no fix rounds, no enhanced renders."""
    progressive: ProgressiveConfig = field(default_factory=lambda: ProgressiveConfig(fix_start=3000, steps_per_fix=2000))
    """Fix rounds (the release's gsplat trainer fixes from 3k steps every 2k, until 60k)."""
    enhancer: EnhancerConfig = EnhancerConfig()
    real_view_loss_weight: float = 1.5
    """Weight of the loss on real views once pseudo views exist (the release's gsplat trainer)."""


@dataclass
class ColmapScene:
    """Pinhole views of a COLMAP model, in OpenCV camera-to-world convention."""

    names: list[str]
    images: torch.Tensor  # [N, H, W, 3] uint8
    camtoworlds: torch.Tensor  # [N, 4, 4]
    Ks: torch.Tensor  # [N, 3, 3]
    points: np.ndarray  # [P, 3]
    colors: np.ndarray  # [P, 3] in [0, 1]

    def subset(self, indices: list[int]) -> ColmapScene:
        return ColmapScene(
            [self.names[i] for i in indices], self.images[indices], self.camtoworlds[indices], self.Ks[indices],
            self.points, self.colors,
        )


def load_colmap_scene(data_dir: Path) -> ColmapScene:
    """The registered images of `data_dir/sparse/0` with their pixels from `data_dir/images`."""
    sparse = data_dir / "sparse" / "0"
    if not sparse.is_dir():
        raise Difix3DError(f"no COLMAP model at {sparse}; run `difix3d scene` or COLMAP first")
    reconstruction = pycolmap.Reconstruction(str(sparse))
    registered = sorted((image for image in reconstruction.images.values() if image.has_pose), key=lambda i: i.name)
    images, camtoworlds, Ks = [], [], []
    for image in registered:
        camera = reconstruction.cameras[image.camera_id]
        if camera.model.name not in ("PINHOLE", "SIMPLE_PINHOLE"):
            raise Difix3DError(f"camera model {camera.model.name} of {image.name}: undistort first (colmap image_undistorter)")
        pixels = iio.imread(data_dir / "images" / image.name)[..., :3]
        if pixels.shape[:2] != (camera.height, camera.width):
            raise Difix3DError(f"{image.name} is {pixels.shape[1]}x{pixels.shape[0]}, its camera {camera.width}x{camera.height}")
        images.append(torch.from_numpy(pixels))
        camtoworlds.append(torch.from_numpy(camera_to_world(image)).float())
        Ks.append(torch.from_numpy(camera.calibration_matrix()).float())
    if len({tuple(image.shape) for image in images}) > 1:
        raise Difix3DError("images of different sizes; this trainer needs one size")
    points = np.array([point.xyz for point in reconstruction.points3D.values()], dtype=np.float32).reshape(-1, 3)
    colors = from_uint8(np.array([point.color for point in reconstruction.points3D.values()], dtype=np.uint8).reshape(-1, 3))
    return ColmapScene([i.name for i in registered], torch.stack(images), torch.stack(camtoworlds), torch.stack(Ks), points, colors)


def split_scene(scene: ColmapScene, test_every: int) -> tuple[ColmapScene, ColmapScene]:
    """(training views, held-out views): frames named *eval* are held out, else every test_every-th."""
    held_out = [i for i, name in enumerate(scene.names) if "eval" in Path(name).stem]
    if not held_out:
        held_out = list(range(0, len(scene.names), test_every))
    train = [i for i in range(len(scene.names)) if i not in held_out]
    return scene.subset(train), scene.subset(held_out)


class Runner:
    """Training state and the steps of one process (one per GPU in multi-GPU mode)."""

    def __init__(self, config: Config, local_rank: int = 0, world_rank: int = 0, world_size: int = 1) -> None:
        config.progressive.validate()
        config.enhancer.validate()
        self.config = config
        self.world_rank, self.world_size = world_rank, world_size
        self.device = torch.device(f"cuda:{local_rank}") if world_size > 1 else resolve_device(config.device)
        torch.manual_seed(config.seed + world_rank)

        scene = load_colmap_scene(config.data_dir)
        self.train_views, self.eval_views = split_scene(scene, config.test_every)
        if len(self.train_views.names) == 0:
            raise Difix3DError("no training views: every image is held out")
        self.images = self.train_views.images.to(self.device)
        self.camtoworlds = self.train_views.camtoworlds.to(self.device)
        self.Ks = self.train_views.Ks.to(self.device)
        self.height, self.width = self.images.shape[1:3]
        centres = self.train_views.camtoworlds[:, :3, 3]
        self.scene_scale = float((centres - centres.mean(0)).norm(dim=-1).max()) * 1.1 or 1.0

        self.ckpt_dir = config.result_dir / "ckpts"
        self.step = 0
        self.view_generator = torch.Generator().manual_seed(config.seed + world_rank)
        self.splats = self._initial_splats(scene)
        self.optimizers = self._make_optimizers()
        self.schedulers = self._make_schedulers()
        self.strategy = config.strategy
        self.strategy.check_sanity(self.splats, self.optimizers)
        self.strategy_state = self.strategy.initialize_state(scene_scale=self.scene_scale)

        self.update: Optional[Difix3DUpdate] = None
        self.enhancer: Optional[Enhancer] = None
        if config.enabled:
            self._start_difix3d()
        self.lpips = LPIPSMetric("alex", device=self.device)
        if config.resume:
            self.load_latest_checkpoint()

    # -- setup -----------------------------------------------------------------------------------

    def _initial_splats(self, scene: ColmapScene) -> torch.nn.ParameterDict:
        points, colors = torch.from_numpy(scene.points), torch.from_numpy(scene.colors)
        if len(points) < 4:
            centre = self.train_views.camtoworlds[:, :3, 3].mean(0)
            points = centre + (torch.rand(self.config.random_init_points, 3) * 2 - 1) * self.scene_scale
            colors = torch.rand(len(points), 3)
        # Each process holds a share of the Gaussians in multi-GPU mode.
        points, colors = points[self.world_rank :: self.world_size], colors[self.world_rank :: self.world_size]
        config = self.config
        return params_from_points(points, colors, config.sh_degree, config.init_opacity, config.init_scale).to(self.device)

    def _make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        # One image per process and step: gsplat's learning-rate scaling for the batch of all processes.
        return splat_optimizers(self.splats, self.scene_scale, batch_size=self.world_size)

    def _make_schedulers(self) -> list[torch.optim.lr_scheduler.LRScheduler]:
        # The means' learning rate decays to 1% over the run, as in gsplat's trainer.
        return [torch.optim.lr_scheduler.ExponentialLR(self.optimizers["means"], gamma=0.01 ** (1.0 / self.config.max_steps))]

    def _start_difix3d(self) -> None:
        from difix3d.core.fixer import DifixFixer
        from difix3d.models.checkpoint import load_difix

        config = self.config
        dtype = resolve_dtype(config.difix_dtype, self.device)
        difix = load_difix(config.difix, device="cpu" if config.difix_offload else self.device, dtype=dtype, base=config.base)
        fixer = DifixFixer(difix, device=self.device, offload=config.difix_offload)
        training_poses = self.train_views.camtoworlds[:, :3]
        targets = select_targets(
            training_poses,
            eval_poses=self.eval_views.camtoworlds[:, :3] if len(self.eval_views.names) else None,
            camera_path=config.progressive.target_camera_path,
        )
        output_dir = config.result_dir / "difix3d"
        if self.world_size > 1:
            output_dir = output_dir / f"rank{self.world_rank}"
        self.update = Difix3DUpdate(
            config.progressive, fixer, training_poses, targets, output_dir,
            render=self.render_poses, training_images=self.training_images, seed=config.seed + self.world_rank,
        )
        self.enhancer = Enhancer(config.enhancer, fixer, training_poses, self.training_images)
        self.log(f"Difix: {config.difix} ({dtype}); {len(targets.poses)} targets from {targets.source}")

    # -- rendering -------------------------------------------------------------------------------

    def rasterize(self, camtoworlds: torch.Tensor, Ks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """RGB [C, H, W, 3] (not clamped), alpha [C, H, W, 1] and gsplat's info, at the training image size."""
        return render_splats(
            self.splats, camtoworlds, Ks, int(self.width), int(self.height),
            sh_degree=min(self.step // self.config.sh_degree_interval, self.config.sh_degree),
            packed=self.config.packed, absgrad=self.strategy.absgrad, distributed=self.world_size > 1,
        )  # fmt: skip

    @torch.no_grad()
    def render_poses(self, poses: torch.Tensor, intrinsics_of: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The core's render callable: poses [T, 3, 4] with the intrinsics of training cameras [T]."""
        colors, alphas, _ = self.rasterize(to_homogeneous(poses).to(self.device), self.Ks[intrinsics_of.to(self.device)])
        return colors.clamp(0, 1), alphas

    def training_images(self, indices: torch.Tensor) -> torch.Tensor:
        """The core's training-image callable: uint8 [K, H, W, 3]."""
        return self.images[indices.to(self.device)]

    # -- training --------------------------------------------------------------------------------

    def train(self) -> dict[str, float]:
        config = self.config
        start = self.step
        progress = tqdm.tqdm(range(start, config.max_steps), initial=start, total=config.max_steps, disable=self.world_rank > 0)
        started = time.perf_counter()
        for step in progress:
            self.step = step
            if self.update is not None:
                plan = self.update.fix_round_if_due(step)
                if plan is not None:
                    self.log(self.update.round_summary(plan))
                    self.save_checkpoint()  # a round costs a Difix pass per target: never repeat it
            loss = self.train_step()
            progress.set_description(f"loss={loss:.3f} gaussians={len(self.splats['means'])}")
            done = step + 1
            if done % config.save_every == 0 and done < config.max_steps:
                self.step = done
                self.save_checkpoint()
            if done in config.eval_steps:
                self.step = done
                self.evaluate()
        self.step = config.max_steps
        self.log(f"{config.max_steps - start} steps in {time.perf_counter() - started:.1f} s")
        self.save_checkpoint()
        return self.evaluate()

    def train_step(self) -> float:
        config = self.config
        pseudo = None if self.update is None else self.update.draw_pseudo_view()
        if pseudo is not None:
            camtoworld = to_homogeneous(pseudo.pose).to(self.device)
            K = self.Ks[pseudo.intrinsics_of]
            target = from_uint8(pseudo.image.to(self.device))
            mask = pseudo.mask.to(self.device).float()
            weight = pseudo.loss_weight
        else:
            index = int(torch.randint(len(self.images), (), generator=self.view_generator))
            camtoworld, K = self.camtoworlds[index], self.Ks[index]
            target, mask = from_uint8(self.images[index]), None
            has_pseudo_views = self.update is not None and self.update.updater.num_rounds > 0
            weight = config.real_view_loss_weight if has_pseudo_views else 1.0

        colors, _, info = self.rasterize(camtoworld[None], K[None])
        colors = colors[0]
        if mask is not None:  # pseudo views: colour and target zeroed where the render was transparent
            colors, target = colors * mask, target * mask
            colors, target = (downsample_for_loss(image, pseudo.loss_downsample) for image in (colors, target))
        self.strategy.step_pre_backward(self.splats, self.optimizers, self.strategy_state, self.step, info)
        l1 = (colors - target).abs().mean()
        ssim_loss = 1 - ssim(colors.permute(2, 0, 1)[None], target.permute(2, 0, 1)[None]).mean()
        loss = weight * ((1 - config.ssim_lambda) * l1 + config.ssim_lambda * ssim_loss)
        loss.backward()
        for optimizer in self.optimizers.values():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        for scheduler in self.schedulers:
            scheduler.step()
        self.strategy.step_post_backward(
            self.splats, self.optimizers, self.strategy_state, self.step, info, packed=config.packed
        )
        return loss.item()

    # -- evaluation ------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """PSNR / SSIM / LPIPS of the renders (and of the Difix3D+ renders) of the held-out views."""
        views = self.eval_views
        if not views.names:
            self.log("no held-out views: nothing to evaluate")
            return {}
        out = self.config.result_dir / "renders" / f"step_{self.step:06d}"
        scores: dict[str, list[float]] = {}
        for name, image, camtoworld, K in zip(views.names, views.images, views.camtoworlds, views.Ks):
            colors, _, _ = self.rasterize(camtoworld[None].to(self.device), K[None].to(self.device))
            renders = {"": colors[0].clamp(0, 1)}
            if self.enhancer is not None:
                renders["_enhanced"] = self.enhancer(renders[""], camtoworld[:3].to(self.device))
            target = from_uint8(image).permute(2, 0, 1)[None].to(self.device)
            for suffix, render in renders.items():
                prediction = render.permute(2, 0, 1)[None]
                scores.setdefault("psnr" + suffix, []).append(float(psnr(prediction, target)))
                scores.setdefault("ssim" + suffix, []).append(float(ssim(prediction, target)))
                lpips = self.lpips(prediction, target)
                if lpips is not None:
                    scores.setdefault("lpips" + suffix, []).append(float(lpips))
                if self.world_rank == 0:
                    pixels = to_uint8(render).cpu().numpy()
                    out.mkdir(parents=True, exist_ok=True)
                    iio.imwrite(out / f"{Path(name).stem}{suffix}.png", pixels)
        metrics = {key: float(np.mean(values)) for key, values in scores.items()}
        metrics["num_gaussians"] = len(self.splats["means"])
        if self.world_rank == 0:
            stats = self.config.result_dir / "stats"
            stats.mkdir(parents=True, exist_ok=True)
            (stats / f"eval_step_{self.step:06d}.json").write_text(json.dumps(metrics, indent=1))
        parts = [f"{key.upper()} {metrics[key]:.4f}" for key in ("psnr", "ssim", "lpips") if key in metrics]
        line = f"eval step {self.step}: " + ", ".join(parts)
        if "psnr_enhanced" in metrics:
            line += " | Difix3D+: " + ", ".join(
                f"{key.upper()} {metrics[key + '_enhanced']:.4f}" for key in ("psnr", "ssim", "lpips") if key + "_enhanced" in metrics
            )
        if "lpips" not in metrics:
            line += " (LPIPS unavailable: no AlexNet weights)"
        self.log(line)
        return metrics

    # -- checkpoints -----------------------------------------------------------------------------

    def _checkpoint_path(self, step: int) -> Path:
        return self.ckpt_dir / f"ckpt_{step:06d}_rank{self.world_rank}.pt"

    def save_checkpoint(self) -> Path:
        """Everything needed to continue exactly: Gaussians, optimizers, schedulers, strategy, Difix3D, RNGs."""
        state = {
            "step": self.step,
            "splats": self.splats.state_dict(),
            "optimizers": {name: optimizer.state_dict() for name, optimizer in self.optimizers.items()},
            "schedulers": [scheduler.state_dict() for scheduler in self.schedulers],
            "strategy_state": self.strategy_state,
            "difix3d": None if self.update is None else self.update.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "views": self.view_generator.get_state()},
        }
        path = self._checkpoint_path(self.step)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save(state, temporary)
        os.replace(temporary, path)  # an interrupted save leaves the previous checkpoints intact
        for old in self._checkpoints()[: -self.config.keep_checkpoints]:
            old.unlink()
        return path

    def _checkpoints(self) -> list[Path]:
        return sorted(self.ckpt_dir.glob(f"ckpt_*_rank{self.world_rank}.pt"))

    def load_latest_checkpoint(self) -> None:
        checkpoints = self._checkpoints()
        if not checkpoints:
            self.log(f"no checkpoint in {self.ckpt_dir}: starting from scratch")
            return
        state = torch.load(checkpoints[-1], map_location=self.device, weights_only=True)
        # Densification changed the number of Gaussians: rebuild the parameters at the saved size.
        self.splats = torch.nn.ParameterDict(
            {name: torch.nn.Parameter(value) for name, value in state["splats"].items()}
        ).to(self.device)
        self.optimizers = self._make_optimizers()
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][name])
        self.schedulers = self._make_schedulers()
        for scheduler, saved in zip(self.schedulers, state["schedulers"]):
            scheduler.load_state_dict(saved)
        self.strategy_state = state["strategy_state"]
        if self.update is not None and state["difix3d"] is not None:
            self.update.load_state_dict(state["difix3d"])
        torch.set_rng_state(state["rng"]["torch"].cpu())
        self.view_generator.set_state(state["rng"]["views"].cpu())
        self.step = state["step"]
        self.log(f"resumed from {checkpoints[-1].name} at step {self.step}")

    def log(self, message: str) -> None:
        if self.world_rank == 0:
            tqdm.tqdm.write(message)


def train(config: Config, local_rank: int = 0, world_rank: int = 0, world_size: int = 1) -> dict[str, float]:
    """Train (or resume) and evaluate; returns the final held-out metrics."""
    runner = Runner(config, local_rank, world_rank, world_size)
    metrics = runner.train()
    if world_rank == 0:
        (config.result_dir / "config.json").write_text(json.dumps(asdict(config), indent=1, default=str))
    return metrics


def _distributed_worker(local_rank: int, world_rank: int, world_size: int, config: Config) -> None:
    train(config, local_rank, world_rank, world_size)


def main() -> None:
    config = tyro.cli(Config)
    try:
        if config.distributed:
            if not torch.cuda.is_available():
                raise Difix3DError("--distributed needs CUDA GPUs")
            from gsplat.distributed import cli

            cli(_distributed_worker, config, verbose=True)
            return
        if resolve_device(config.device).type == "cpu":
            configure_cpu_runtime(config.cpu_threads)
        train(config)
    except Difix3DError as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
