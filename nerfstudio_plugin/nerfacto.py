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
from typing import Dict, Tuple, Type

import torch
from nerfstudio.models.nerfacto import NerfactoModel, NerfactoModelConfig
from nerfstudio.utils import colormaps

from difix3d.metrics import LPIPSMetric
from nerfstudio_plugin.enhanced_outputs import EnhancedRenders


@dataclass
class Difix3DNerfactoModelConfig(NerfactoModelConfig):
    """Nerfacto's options, plus Difix3D+ renders."""

    _target: Type = field(default_factory=lambda: Difix3DNerfactoModel)
    enhance_renders: bool = True
    """Add `rgb_enhanced` (Difix on the render) to renders outside training (ns-render, ns-eval, viewer)."""


class Difix3DNerfactoModel(EnhancedRenders, NerfactoModel):
    config: Difix3DNerfactoModelConfig

    def populate_modules(self) -> None:
        try:
            super().populate_modules()
        except OSError:  # torchmetrics' LPIPS could not fetch its AlexNet weights (built last)
            if not hasattr(self, "psnr"):
                raise
            self.step = 0
        # torchmetrics' LPIPS (a submodule, when it could be built) gives way to difix3d's offline one,
        # a plain object whose weights stay out of the checkpoints.
        if "lpips" in self._modules:
            del self.lpips
        self.lpips = LPIPSMetric("alex")

    def get_loss_dict(self, outputs, batch, metrics_dict=None) -> Dict[str, torch.Tensor]:
        loss_dict = super().get_loss_dict(outputs, batch, metrics_dict)
        if "loss_weight" in batch:  # pseudo views weigh less
            loss_dict["rgb_loss"] = loss_dict["rgb_loss"] * batch["loss_weight"]
        return loss_dict

    def get_image_metrics_and_images(
        self, outputs: Dict[str, torch.Tensor], batch: Dict[str, torch.Tensor]
    ) -> Tuple[Dict[str, float], Dict[str, torch.Tensor]]:
        gt_rgb = self.renderer_rgb.blend_background(batch["image"].to(self.device))
        metrics, images = self.render_metrics_and_images(outputs, gt_rgb)
        images["accumulation"] = colormaps.apply_colormap(outputs["accumulation"])
        images["depth"] = colormaps.apply_depth_colormap(outputs["depth"], accumulation=outputs["accumulation"])
        return metrics, images
