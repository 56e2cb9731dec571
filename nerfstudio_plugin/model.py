"""Splatfacto, made device-agnostic and offline-safe, with Difix3D+ enhanced renders.

Differences from nerfstudio's SplatfactoModel, and why:
- rasterization goes through `difix3d.rasterize` (gsplat on CUDA, PyTorch on CPU) and nothing calls
  `.cuda()`, so `--machine.device-type cpu` trains;
- `populate_modules` is Splatfacto's, with seed colours applied on the CPU (Splatfacto puts them on
  CUDA) and `difix3d.metrics.LPIPSMetric("alex")` as LPIPS instead of torchmetrics' (which
  downloads AlexNet at construction): the same LPIPS v0.1, with ImageNet weights from
  `difix3d.imagenet_weights`, never downloaded; where they are missing LPIPS is left out (logged);
- pseudo-view batches carry a `mask` (applied by the parent) and a `loss_weight` (applied here);
- `get_outputs_for_camera` adds `rgb_enhanced`: Difix on the render, referenced by the nearest
  training image(s) — the "+" of Difix3D+, computed only when read (`enhanced_outputs`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Tuple, Type, Union
from unittest import mock

import torch
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.models.splatfacto import RGB2SH, SplatfactoModel, SplatfactoModelConfig, get_viewmat

from difix3d.images import from_uint8
from difix3d.metrics import LPIPSMetric
from difix3d.rasterize import rasterization
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


class Difix3DGSModel(EnhancedRenders, SplatfactoModel):
    config: Difix3DGSModelConfig

    def populate_modules(self) -> None:
        # Splatfacto's own setup, with two differences. It moves seed colours to CUDA: it gets none,
        # and they are applied here. It builds torchmetrics' LPIPS, which downloads AlexNet: that
        # class is swapped for difix3d's offline LPIPS for the call (a plain attribute, not a
        # submodule, so its weights stay out of the 3DGS checkpoints). Calling the parent (rather
        # than copying its 60 lines) keeps its draws from the RNG, so runs reproduce earlier ones.
        seed_points = self.seed_points
        if seed_points is not None:
            self.seed_points = (seed_points[0], seed_points[1][:0])
        with mock.patch("torchmetrics.image.lpip.LearnedPerceptualImagePatchSimilarity", lambda **_: LPIPSMetric("alex")):
            super().populate_modules()
        self.seed_points = seed_points
        if seed_points is not None and not self.config.random_init and len(seed_points[1]) > 0:
            colours = from_uint8(seed_points[1].to(torch.uint8))
            if self.config.sh_degree > 0:
                self.gauss_params["features_dc"].data = RGB2SH(colours)
            else:
                self.gauss_params["features_dc"].data = torch.logit(colours, eps=1e-10)

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
        if "loss_weight" in batch:  # pseudo views weigh less (their mask was applied by the parent)
            loss_dict["main_loss"] = loss_dict["main_loss"] * batch["loss_weight"]
        return loss_dict

    def get_image_metrics_and_images(
        self, outputs: Dict[str, torch.Tensor], batch: Dict[str, torch.Tensor]
    ) -> Tuple[Dict[str, float], Dict[str, torch.Tensor]]:
        gt_rgb = self.composite_with_background(self.get_gt_img(batch["image"]), outputs["background"])
        return self.render_metrics_and_images(outputs, gt_rgb)
