"""A plain 3D Gaussian Splatting fitter: posed images and seed points in, Gaussians out.

The reconstruction behind the ground-truth data engine (`difix3d.data.ground_truth_pairs`), in the
manner of gsplat's `examples/simple_trainer.py` and with Splatfacto's defaults: SH colours whose
degree grows every `sh_degree_interval` steps, L1 + 0.2 (1 - SSIM) on a random background, gsplat's
`DefaultStrategy` for densification, Splatfacto's learning rates (the means' rate scaled by the
scene's extent and decayed exponentially). Rendering goes through `difix3d.rendering.rasterize`, so it runs
on the CPU as well as with gsplat's CUDA kernels.

Poses are OpenCV camera-to-world matrices (x right, y down, z forward) in any metric world frame.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from difix3d.metrics import ssim
from difix3d.rendering.rasterize import rasterization

SH_C0 = 0.28209479177387814  # degree-0 spherical-harmonics constant: colour = SH_C0 * sh0 + 0.5
# Splatfacto renders uncovered pixels in this colour at evaluation (viser's background); the library's
# renders do the same, so that they look like the ones Difix gets from `difix3d-gs`.
EVAL_BACKGROUND = (0.1490, 0.1647, 0.2157)


@dataclass
class SplatFitConfig:
    """Training schedule (Splatfacto's; learning rates: `splat_optimizers`)."""

    steps: int = 1000
    sh_degree: int = 3
    sh_degree_interval: int = 1000
    ssim_lambda: float = 0.2
    init_opacity: float = 0.1
    means_lr_decay: float = 0.01
    """The means' learning rate decays by this factor over `means_lr_decay_steps` (Splatfacto: 1.6e-4 to 1.6e-6 in 30k)."""
    means_lr_decay_steps: int = 30000
    refine_start: int = 500
    refine_stop: int = 15000
    refine_every: int = 100
    reset_opacity_every: int = 3000
    seed: int = 0


def params_from_points(
    points: Tensor, colors: Tensor, sh_degree: int, init_opacity: float = 0.1, init_scale: float = 1.0
) -> torch.nn.ParameterDict:
    """Gaussians at `points` [N, 3] with `colors` [N, 3] in [0, 1], as gsplat's and Splatfacto's
    initialisation makes them: isotropic, `init_scale` times the RMS distance to the three nearest
    neighbours, random rotations, opacity `init_opacity`, SH colours up to `sh_degree` (degree 0 set)."""
    from scipy.spatial import cKDTree

    points = points.float()
    distances, _ = cKDTree(points.numpy()).query(points.numpy(), k=min(4, len(points)))
    neighbour = torch.from_numpy(np.sqrt((np.atleast_2d(distances)[:, 1:] ** 2).mean(-1))).float().clamp_min(1e-7)
    count = len(points)
    sh = torch.zeros(count, (sh_degree + 1) ** 2, 3)
    sh[:, 0] = (colors.float() - 0.5) / SH_C0
    params = {
        "means": points,
        "scales": torch.log(neighbour * init_scale)[:, None].repeat(1, 3),
        "quats": torch.rand(count, 4),
        "opacities": torch.logit(torch.full((count,), init_opacity)),
        "sh0": sh[:, :1],
        "shN": sh[:, 1:],
    }
    return torch.nn.ParameterDict({name: torch.nn.Parameter(value) for name, value in params.items()})


def splat_optimizers(params: torch.nn.ParameterDict, scene_scale: float, batch_size: int = 1) -> dict[str, torch.optim.Optimizer]:
    """One Adam per parameter group with Splatfacto's / gsplat's learning rates (the means' scaled by
    the scene's extent), scaled for `batch_size` images per step as gsplat's trainer does."""
    rates = {"means": 1.6e-4 * scene_scale, "scales": 5e-3, "quats": 1e-3, "opacities": 5e-2, "sh0": 2.5e-3, "shN": 2.5e-3 / 20}
    return {
        name: torch.optim.Adam(
            [{"params": params[name], "lr": rate * math.sqrt(batch_size), "name": name}],
            eps=1e-15 / math.sqrt(batch_size),
            betas=(1 - batch_size * (1 - 0.9), 1 - batch_size * (1 - 0.999)),
        )
        for name, rate in rates.items()
    }


def render_splats(
    params: torch.nn.ParameterDict | dict[str, Tensor],
    camera_to_world: Tensor,
    K: Tensor,
    width: int,
    height: int,
    sh_degree: int,
    background: Tensor | None = None,
    **rasterize_options,
) -> tuple[Tensor, Tensor, dict]:
    """Renders [C, H, W, 3] colours (not clamped) and [C, H, W, 1] opacity for C OpenCV
    camera-to-world poses [C, 4, 4] (or [C, 3, 4]) with intrinsics K [C, 3, 3]; `background` [C, 3]
    or None (black); other options go to `difix3d.rendering.rasterize.rasterization` (gsplat's)."""
    poses = camera_to_world
    if poses.shape[-2] == 3:
        bottom = torch.tensor([0, 0, 0, 1], dtype=poses.dtype, device=poses.device).expand(*poses.shape[:-2], 1, 4)
        poses = torch.cat([poses, bottom], dim=-2)
    return rasterization(
        means=params["means"],
        quats=params["quats"],
        scales=params["scales"].exp(),
        opacities=params["opacities"].sigmoid(),
        colors=torch.cat([params["sh0"], params["shN"]], dim=1),
        viewmats=torch.linalg.inv(poses.float()),
        Ks=K.float(),
        width=width,
        height=height,
        sh_degree=sh_degree,
        backgrounds=background,
        **rasterize_options,
    )


def fit_splats(
    images: Tensor | Sequence[Tensor],
    camera_to_world: Tensor,
    K: Tensor,
    points: Tensor,
    colors: Tensor,
    config: SplatFitConfig,
    on_step: Callable[[int, torch.nn.ParameterDict], None] | None = None,
    snapshot_steps: Sequence[int] = (),
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> torch.nn.ParameterDict:
    """Fits Gaussians to `images` [N, H, W, 3] in [0, 1] (or N tensors [H, W, 3] of any sizes) seen
    from poses [N, 4, 4] with K [N, 3, 3], on `device` (random draws stay on the CPU, so a seed gives
    the same views and backgrounds on any device).

    `on_step(step, params)` is called after the optimiser step for every step in `snapshot_steps`
    (1-based: after that many steps), e.g. to render an under-trained model.
    """
    from gsplat.strategy import DefaultStrategy

    generator = torch.Generator().manual_seed(config.seed)
    centres = camera_to_world[:, :3, 3]
    scene_scale = float((centres - centres.mean(dim=0)).norm(dim=-1).max()) * 1.1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        params = params_from_points(points, colors, config.sh_degree, config.init_opacity).to(device)
    camera_to_world, K = camera_to_world.to(device), K.to(device)
    optimizers = splat_optimizers(params, scene_scale)
    decay = config.means_lr_decay ** (1 / config.means_lr_decay_steps)
    means_schedule = torch.optim.lr_scheduler.ExponentialLR(optimizers["means"], gamma=decay)
    strategy = DefaultStrategy(
        refine_start_iter=config.refine_start,
        refine_stop_iter=config.refine_stop,
        refine_every=config.refine_every,
        reset_every=config.reset_opacity_every,
        verbose=False,
    )
    strategy.check_sanity(params, optimizers)
    state = strategy.initialize_state(scene_scale=scene_scale)
    snapshots = set(snapshot_steps)
    for step in tqdm(range(config.steps), desc="3DGS", unit="step", disable=not progress, leave=False):
        index = int(torch.randint(len(images), (1,), generator=generator))
        background = torch.rand(1, 3, generator=generator).to(device)
        sh_degree = min(step // config.sh_degree_interval, config.sh_degree)
        target = images[index][None].to(device)
        height, width = target.shape[1:3]
        rgb, _, info = render_splats(params, camera_to_world[index : index + 1], K[index : index + 1], width, height,
                                     sh_degree, background, packed=False)  # fmt: skip
        rgb = rgb.clamp(0, 1)
        l1 = (rgb - target).abs().mean()
        ssim_loss = 1 - ssim(rgb.permute(0, 3, 1, 2), target.permute(0, 3, 1, 2))
        loss = (1 - config.ssim_lambda) * l1 + config.ssim_lambda * ssim_loss
        strategy.step_pre_backward(params, optimizers, state, step, info)
        loss.backward()
        for optimizer in optimizers.values():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        means_schedule.step()
        strategy.step_post_backward(params, optimizers, state, step, info, packed=False)
        if on_step is not None and step + 1 in snapshots:
            with torch.no_grad():
                on_step(step + 1, params)
    return params


def seed_points_from_depth(
    images: np.ndarray,
    depths: np.ndarray,
    camera_to_world: np.ndarray,
    K: np.ndarray,
    count: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """`count` coloured surface points seen by the given views: random pixels lifted by their
    depth, a stand-in for SfM's sparse points. images [N, H, W, 3], depths [N, H, W] (z depth)."""
    views, height, width = depths.shape
    per_view = math.ceil(count / views)
    points, colours = [], []
    for view in range(views):
        v = rng.integers(0, height, per_view)
        u = rng.integers(0, width, per_view)
        z = depths[view, v, u]
        keep = np.isfinite(z) & (z > 0)
        v, u, z = v[keep], u[keep], z[keep]
        camera = np.stack([(u + 0.5 - K[view, 0, 2]) / K[view, 0, 0] * z,
                           (v + 0.5 - K[view, 1, 2]) / K[view, 1, 1] * z, z], axis=-1)  # fmt: skip
        pose = camera_to_world[view]
        points.append(camera @ pose[:3, :3].T + pose[:3, 3])
        colours.append(images[view, v, u])
    return np.concatenate(points)[:count], np.concatenate(colours)[:count]
