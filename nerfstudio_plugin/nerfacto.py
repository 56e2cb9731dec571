"""Nerfacto with the Difix3D steps: the model of `difix3d-nerfacto`.

Differences from nerfstudio's NerfactoModel, and why:
- pseudo-view ray batches carry a `loss_weight`, applied to the photometric loss (their rays are
  drawn inside the accumulation mask, so no mask is needed here);
- `get_outputs_for_camera` adds `rgb_enhanced` (Difix3D+, installed by the pipeline); ns-eval
  reports `psnr_enhanced`, `ssim_enhanced` (and `lpips_enhanced`) beside nerfacto's metrics;
- LPIPS comes from `difix3d.metrics`, which never downloads. Nerfacto builds torchmetrics' LPIPS as
  the last step of `populate_modules`, which fetches AlexNet weights; offline that raises, and the
  model carries on without it (LPIPS is then left out of the metrics, not reported as a number).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple, Type

import torch
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.data.scene_box import OrientedBox
from nerfstudio.models.nerfacto import NerfactoModel, NerfactoModelConfig
from nerfstudio.utils import colormaps

from difix3d.metrics import LPIPSMetric

# (rendered RGB [H, W, 3] in [0, 1], camera-to-world [3, 4]) -> enhanced RGB [H, W, 3]
Enhancer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Difix3DNerfactoModelConfig(NerfactoModelConfig):
    """Nerfacto's options, plus Difix3D+ renders."""

    _target: Type = field(default_factory=lambda: Difix3DNerfactoModel)
    enhance_renders: bool = True
    """Add `rgb_enhanced` (Difix on the render) to renders outside training (ns-render, ns-eval, viewer)."""


class Difix3DNerfactoModel(NerfactoModel):
    config: Difix3DNerfactoModelConfig

    def populate_modules(self) -> None:
        try:
            super().populate_modules()
        except OSError:  # torchmetrics' LPIPS could not fetch its AlexNet weights (built last)
            if not hasattr(self, "psnr"):
                raise
            self.step = 0
        self.lpips = None
        self.lpips_metric = LPIPSMetric("alex")
        self.enhancer: Optional[Enhancer] = None

    def set_enhancer(self, enhancer: Optional[Enhancer]) -> None:
        """Install the Difix3D+ post-render enhancer (done by the pipeline once Difix is loaded)."""
        self.enhancer = enhancer

    def get_loss_dict(self, outputs, batch, metrics_dict=None) -> Dict[str, torch.Tensor]:
        loss_dict = super().get_loss_dict(outputs, batch, metrics_dict)
        if "loss_weight" in batch:  # pseudo views weigh less
            loss_dict["rgb_loss"] = loss_dict["rgb_loss"] * batch["loss_weight"]
        return loss_dict

    @torch.no_grad()
    def get_outputs_for_camera(self, camera: Cameras, obb_box: Optional[OrientedBox] = None) -> Dict[str, torch.Tensor]:
        outputs = super().get_outputs_for_camera(camera, obb_box)
        if self.enhancer is not None and self.config.enhance_renders and not self.training:
            outputs["rgb_enhanced"] = self.enhancer(outputs["rgb"], camera.camera_to_worlds[0].to(self.device))
        return outputs

    def get_image_metrics_and_images(
        self, outputs: Dict[str, torch.Tensor], batch: Dict[str, torch.Tensor]
    ) -> Tuple[Dict[str, float], Dict[str, torch.Tensor]]:
        gt_rgb = self.renderer_rgb.blend_background(batch["image"].to(self.device))
        metrics: Dict[str, float] = {}
        images = {
            "img": torch.cat([gt_rgb, outputs["rgb"]], dim=1),
            "accumulation": colormaps.apply_colormap(outputs["accumulation"]),
            "depth": colormaps.apply_depth_colormap(outputs["depth"], accumulation=outputs["accumulation"]),
        }
        for name, suffix in (("rgb", ""), ("rgb_enhanced", "_enhanced")):
            if name in outputs:
                metrics.update({key + suffix: value for key, value in self._image_metrics(outputs[name], gt_rgb).items()})
        if "rgb_enhanced" in outputs:
            images["img_enhanced"] = torch.cat([gt_rgb, outputs["rgb_enhanced"]], dim=1)
        return metrics, images

    def _image_metrics(self, prediction: torch.Tensor, target: torch.Tensor) -> Dict[str, float]:
        """PSNR, SSIM as Nerfacto computes them; LPIPS only where its backbone weights exist."""
        prediction = torch.moveaxis(prediction, -1, 0)[None]
        target = torch.moveaxis(target, -1, 0)[None]
        metrics = {"psnr": float(self.psnr(target, prediction).item()), "ssim": float(self.ssim(target, prediction))}
        lpips = self.lpips_metric(prediction, target)
        if lpips is not None:
            metrics["lpips"] = float(lpips.mean())
        return metrics
