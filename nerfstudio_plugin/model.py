"""Splatfacto, made device-agnostic and offline-safe, with Difix3D+ enhanced renders.

Differences from nerfstudio's SplatfactoModel, and why:
- rasterization goes through `difix3d.rendering.rasterize` (gsplat on CUDA, PyTorch on CPU) and nothing calls
  `.cuda()`, so `--machine.device-type cpu` trains;
- `populate_modules` sets up Splatfacto's modules with seed colours on the model's device (Splatfacto
  puts them on CUDA) and `difix3d.metrics.LPIPSMetric("alex")` as LPIPS instead of torchmetrics'
  (which downloads AlexNet at construction): the same LPIPS v0.1, with ImageNet weights from
  `difix3d.imagenet_weights`, never downloaded; where they are missing LPIPS is left out (logged);
- pseudo-view batches carry a `mask` (applied by the parent) and a `loss_weight` (applied here), and
  with a `loss_downsample` > 1 their photometric loss compares the pooled images (`downsample_for_loss`);
- `get_outputs_for_camera` adds `rgb_enhanced`: Difix on the render, referenced by the nearest
  training image(s) — the "+" of Difix3D+, computed only when read (`enhanced_outputs`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Tuple, Type, Union

import torch
from gsplat.strategy import DefaultStrategy
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.model_components.lib_bilagrid import BilateralGrid
from nerfstudio.models.splatfacto import (
    RGB2SH, SplatfactoModel, SplatfactoModelConfig, get_viewmat, num_sh_bases, random_quat_tensor,
)
from nerfstudio.utils.colors import get_color
from pytorch_msssim import SSIM

from difix3d.core.steps import downsample_for_loss
from difix3d.images import from_uint8
from difix3d.metrics import LPIPSMetric
from difix3d.rendering.gaussians import EVAL_BACKGROUND
from difix3d.rendering.rasterize import rasterization
from nerfstudio_plugin.enhanced_outputs import EnhancedRenders

# nerfstudio compiles get_viewmat; the viewer interrupts a render by raising from a trace hook, which
# inside compiled code becomes an internal dynamo error that kills the viewer's render thread.
viewmat_of = getattr(get_viewmat, "__wrapped__", get_viewmat)

@dataclass
class Difix3DGSModelConfig(SplatfactoModelConfig):
    """Splatfacto's options, plus Difix3D+ renders."""

    _target: Type = field(default_factory=lambda: Difix3DGSModel)
    enhance_renders: bool = True
    """Add `rgb_enhanced` (Difix on the render) to renders outside training (ns-render, ns-eval, viewer)."""


def psnr_over_all_values(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR (dB, values in [0, 1]) over every value of two same-shaped tensors, as Splatfacto's
    torchmetrics `PeakSignalNoiseRatio(data_range=1.0)` computes it (on [H, W, 3] in training, [1, 3, H, W]
    in evaluation). Not torchmetrics itself: importing it pulls in transformers, about 4 s of CPU at
    every ns-train, ns-render and ns-eval start."""
    return 10.0 * torch.log10(1.0 / (prediction.float() - target.float()).square().mean())


class Difix3DGSModel(EnhancedRenders, SplatfactoModel):
    config: Difix3DGSModelConfig

    def populate_modules(self) -> None:
        """Splatfacto's modules (nerfstudio 1.1.5), set up here for two reasons: Splatfacto builds seed
        colours with `.cuda()`, and torchmetrics' LPIPS, which downloads AlexNet when it is built.

        The random draws come in the order this plugin has always made them (Splatfacto's, plus its
        random colours even for a seeded model), so a seed reproduces earlier runs and benchmarks.
        """
        config = self.config
        seeded = self.seed_points is not None and not config.random_init
        if seeded:
            means = self.seed_points[0]
        else:
            means = (torch.rand((config.num_random, 3)) - 0.5) * config.random_scale
        # Initial scale: the mean distance to the three nearest neighbours, in every axis.
        neighbour_distances, _ = self.k_nearest_sklearn(means, 3)
        log_scales = torch.log(torch.from_numpy(neighbour_distances).mean(dim=-1, keepdim=True)).repeat(1, 3)
        num_points = means.shape[0]
        quats = random_quat_tensor(num_points)
        features_dc = torch.rand(num_points, 3)
        if seeded and len(self.seed_points[1]) > 0:
            colours = from_uint8(self.seed_points[1].to(torch.uint8))
            features_dc = RGB2SH(colours) if config.sh_degree > 0 else torch.logit(colours, eps=1e-10)
        gaussians = {
            "means": means, "scales": log_scales, "quats": quats, "features_dc": features_dc,
            "features_rest": torch.zeros((num_points, num_sh_bases(config.sh_degree) - 1, 3)),
            "opacities": torch.logit(torch.full((num_points, 1), 0.1)),
        }  # fmt: skip
        self.gauss_params = torch.nn.ParameterDict({name: torch.nn.Parameter(value) for name, value in gaussians.items()})
        self.camera_optimizer = config.camera_optimizer.setup(num_cameras=self.num_train_data, device="cpu")

        self.psnr = psnr_over_all_values
        self.ssim = SSIM(data_range=1.0, size_average=True, channel=3)
        # A plain attribute, not a submodule: its weights stay out of the 3DGS checkpoints.
        self.lpips = LPIPSMetric("alex")
        self.step = 0
        self.crop_box = None
        # Splatfacto's "random" background renders, outside training, on viser's default colour.
        self.background_color = (
            torch.tensor(EVAL_BACKGROUND) if config.background_color == "random" else get_color(config.background_color)
        )
        if config.use_bilateral_grid:
            self.bil_grids = BilateralGrid(num=self.num_train_data, grid_X=config.grid_shape[0],
                                           grid_Y=config.grid_shape[1], grid_W=config.grid_shape[2])  # fmt: skip
        self.strategy = DefaultStrategy(
            prune_opa=config.cull_alpha_thresh,
            grow_grad2d=config.densify_grad_thresh,
            grow_scale3d=config.densify_size_thresh,
            grow_scale2d=config.split_screen_size,
            prune_scale3d=config.cull_scale_thresh,
            prune_scale2d=config.cull_screen_size,
            refine_scale2d_stop_iter=config.stop_screen_size_at,
            refine_start_iter=config.warmup_length,
            refine_stop_iter=config.stop_split_at,
            reset_every=config.reset_alpha_every * config.refine_every,
            refine_every=config.refine_every,
            pause_refine_after_reset=self.num_train_data + config.refine_every,
            absgrad=config.use_absgrad,
            revised_opacity=False,
            verbose=True,
        )
        self.strategy_state = self.strategy.initialize_state(scene_scale=1.0)

    def load_state_dict(self, state_dict, strict: bool = True, **kwargs):  # type: ignore[override]
        """Load a checkpoint with a different number of Gaussians (a run that densified).

        Splatfacto's own version swaps in new, resized Parameter objects, but the trainer built the
        optimizers on the old ones (sized at construction): the optimizers then step tensors the model
        no longer uses and the next refinement indexes them out of bounds. Resizing in place keeps
        the optimizers pointing at the model's parameters.
        """
        self.step = 30000  # as Splatfacto: a loaded model renders at its full SH degree
        if "means" in state_dict:  # checkpoints of older nerfstudio versions, as Splatfacto maps them
            for name in ("means", "scales", "quats", "features_dc", "features_rest", "opacities"):
                state_dict[f"gauss_params.{name}"] = state_dict[name]
        count = state_dict["gauss_params.means"].shape[0]
        for param in self.gauss_params.values():
            param.data = param.data.new_zeros((count, *param.shape[1:]))
        return super(SplatfactoModel, self).load_state_dict(state_dict, strict=strict, **kwargs)

    def get_outputs(self, camera: Cameras) -> Dict[str, Union[torch.Tensor, list]]:
        if not isinstance(camera, Cameras):
            raise TypeError("Difix3DGSModel.get_outputs expects a nerfstudio Cameras object")
        if self.training:
            assert camera.shape[0] == 1, "Only one camera at a time"
            camera_to_world = self.camera_optimizer.apply_to_camera(camera)
        else:
            camera_to_world = camera.camera_to_worlds

        params = {name: self.gauss_params[name] for name in self.gauss_params.keys()}
        if self.crop_box is not None and not self.training:
            inside = self.crop_box.within(self.means).squeeze()
            if inside.sum() == 0:
                return self.get_empty_outputs(int(camera.width.item()), int(camera.height.item()), self.background_color)
            params = {name: value[inside] for name, value in params.items()}
        colours = torch.cat((params["features_dc"][:, None, :], params["features_rest"]), dim=1)
        if self.config.sh_degree > 0:
            sh_degree = min(self.step // self.config.sh_degree_interval, self.config.sh_degree)
        else:
            colours, sh_degree = torch.sigmoid(colours).squeeze(1), None

        downscale = self._get_downscale_factor()
        camera.rescale_output_resolution(1 / downscale)
        intrinsics = camera.get_intrinsics_matrices().to(self.device)
        width, height = int(camera.width.item()), int(camera.height.item())
        camera.rescale_output_resolution(downscale)
        self.last_size = (height, width)

        render_mode = "RGB+ED" if self.config.output_depth_during_training or not self.training else "RGB"
        render, alpha, self.info = rasterization(
            means=params["means"],
            quats=params["quats"],
            scales=torch.exp(params["scales"]),
            opacities=torch.sigmoid(params["opacities"]).squeeze(-1),
            colors=colours,
            viewmats=viewmat_of(camera_to_world),
            Ks=intrinsics,
            width=width,
            height=height,
            packed=False,
            near_plane=0.01,
            far_plane=1e10,
            render_mode=render_mode,
            sh_degree=sh_degree,
            sparse_grad=False,
            absgrad=self.strategy.absgrad,
            rasterize_mode=self.config.rasterize_mode,
        )
        if self.training:
            self.strategy.step_pre_backward(self.gauss_params, self.optimizers, self.strategy_state, self.step, self.info)

        background = self._get_background_color()
        rgb = torch.clamp(render[..., :3] + (1 - alpha) * background, 0.0, 1.0)
        if self.config.use_bilateral_grid and self.training and camera.metadata and "cam_idx" in camera.metadata:
            rgb = self._apply_bilateral_grid(rgb, camera.metadata["cam_idx"], height, width)
        depth = None
        if render_mode == "RGB+ED":
            depth = render[..., 3:4]
            depth = torch.where(alpha > 0, depth, depth.detach().max()).squeeze(0)
        if background.shape[0] == 3 and not self.training:
            background = background.expand(height, width, 3)
        return {"rgb": rgb.squeeze(0), "depth": depth, "accumulation": alpha.squeeze(0), "background": background}

    def get_loss_dict(self, outputs, batch, metrics_dict=None) -> Dict[str, torch.Tensor]:
        loss_dict = super().get_loss_dict(outputs, batch, metrics_dict)
        factor = batch.get("loss_downsample", 1)
        if factor > 1:  # the parent's photometric loss, on the masked images pooled
            mask = self._downscale_if_required(batch["mask"]).to(self.device)
            gt = self.composite_with_background(self.get_gt_img(batch["image"]), outputs["background"])
            gt, pred = (downsample_for_loss(image * mask, factor) for image in (gt, outputs["rgb"]))
            l1 = torch.abs(gt - pred).mean()
            ssim_loss = 1 - self.ssim(gt.permute(2, 0, 1)[None], pred.permute(2, 0, 1)[None])
            loss_dict["main_loss"] = (1 - self.config.ssim_lambda) * l1 + self.config.ssim_lambda * ssim_loss
        if "loss_weight" in batch:  # pseudo views weigh less (their mask was applied by the parent)
            loss_dict["main_loss"] = loss_dict["main_loss"] * batch["loss_weight"]
        return loss_dict

    def get_image_metrics_and_images(
        self, outputs: Dict[str, torch.Tensor], batch: Dict[str, torch.Tensor]
    ) -> Tuple[Dict[str, float], Dict[str, torch.Tensor]]:
        gt_rgb = self.composite_with_background(self.get_gt_img(batch["image"]), outputs["background"])
        return self.render_metrics_and_images(outputs, gt_rgb)
