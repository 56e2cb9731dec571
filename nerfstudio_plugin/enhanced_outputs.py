"""`rgb_enhanced` computed only when someone asks for it.

Difix costs several times a splat render, so the models offer `rgb_enhanced` without computing it:
`get_outputs_for_camera` returns `EnhancedOutputs`, a dict that lists `rgb_enhanced` among its keys
and runs the enhancer the first time that key is read. ns-render and ns-eval read it by name
(`--rendered-output-names rgb_enhanced`, the `_enhanced` metrics); an `rgb` frame never does.

The viewer reads the displayed output after its render, outside its interrupt hook and training
lock. So a frame rendered by the viewer's render thread is enhanced up front (interruptible, under
the lock) when `rgb_enhanced` is shown, in the main or the split view; the low-resolution frames sent
while the camera moves show the plain render, and the settled frame is enhanced.
"""

from __future__ import annotations

import threading
from typing import Callable, Dict, Optional, Tuple

import torch
from nerfstudio.viewer.render_state_machine import RenderStateMachine

ENHANCED = "rgb_enhanced"


class EnhancedOutputs(dict):
    """A model's outputs whose lazy entries are computed (once) when first read."""

    def __init__(self, outputs: Dict[str, torch.Tensor], lazy: Dict[str, Callable[[], torch.Tensor]]) -> None:
        super().__init__(outputs)
        self._lazy = dict(lazy)

    def __missing__(self, name: str) -> torch.Tensor:
        if name not in self._lazy:
            raise KeyError(name)
        with torch.no_grad():
            value = self[name] = self._lazy.pop(name)()
        return value

    def __contains__(self, name: object) -> bool:
        return super().__contains__(name) or name in self._lazy

    def __iter__(self):
        return iter(self.keys())

    def __len__(self) -> int:
        return super().__len__() + len(self._lazy)

    def keys(self):  # type: ignore[override]
        return list(super().keys()) + list(self._lazy)

    def get(self, name, default=None):  # type: ignore[override]
        return self[name] if name in self else default

    def items(self):  # type: ignore[override]
        return [(name, self[name]) for name in self.keys()]

    def values(self):  # type: ignore[override]
        return [self[name] for name in self.keys()]


def viewer_wants_enhanced() -> bool:
    """True when called by the viewer's render thread for a frame that shows `rgb_enhanced`
    (main or split view) and is no low-resolution frame of a moving camera."""
    renderer = threading.current_thread()
    if not isinstance(renderer, RenderStateMachine) or renderer.state == "low_move":
        return False
    panel = renderer.viewer.control_panel
    return panel.output_render == ENHANCED or (panel.split and panel.split_output_render == ENHANCED)


def in_viewer() -> bool:
    return isinstance(threading.current_thread(), RenderStateMachine)


def with_enhanced(outputs: Dict[str, torch.Tensor], enhance: Callable[[], torch.Tensor]) -> EnhancedOutputs:
    """`outputs` plus `rgb_enhanced` = `enhance()`, computed when read; in the viewer, computed now
    when it is displayed, and the plain render while the camera moves."""
    result = EnhancedOutputs(outputs, {ENHANCED: enhance})
    if in_viewer():
        if viewer_wants_enhanced():
            result[ENHANCED]  # noqa: B018 - computed here, inside the viewer's lock and interrupt hook
        else:
            result[ENHANCED] = outputs["rgb"]
            result._lazy.clear()
    return result


# (rendered RGB [H, W, 3] in [0, 1], camera-to-world [3, 4]) -> enhanced RGB [H, W, 3]
Enhancer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class EnhancedRenders:
    """What `difix3d-gs` and `difix3d-nerfacto` add to their nerfstudio model (a base listed before
    it): `rgb_enhanced` in renders outside training, and the metrics of `rgb` and `rgb_enhanced`.

    The model must have `config.enhance_renders`, and `psnr`, `ssim` and `lpips` (a
    `difix3d.metrics.LPIPSMetric`, None where its ImageNet weights are missing) as its metrics.
    """

    # A plain attribute, never an nn.Module (`set_enhancer` checks): Difix's weights stay out of the
    # model's state_dict (the 3D checkpoints), its parameters and its `.to()`.
    enhancer: Optional[Enhancer] = None

    def set_enhancer(self, enhancer: Optional[Enhancer]) -> None:
        """Install the Difix3D+ post-render enhancer (done by the pipeline once Difix is loaded)."""
        if isinstance(enhancer, torch.nn.Module):
            raise TypeError("the enhancer must not be an nn.Module: its weights would enter the 3D checkpoints")
        self.enhancer = enhancer

    @torch.no_grad()
    def get_outputs_for_camera(self, camera, obb_box=None) -> Dict[str, torch.Tensor]:
        outputs = super().get_outputs_for_camera(camera, obb_box)  # type: ignore[misc]
        enhancer = self.enhancer
        if enhancer is not None and self.config.enhance_renders and not self.training:  # type: ignore[attr-defined]
            pose = camera.camera_to_worlds[0]
            outputs = with_enhanced(outputs, lambda: enhancer(outputs["rgb"], pose))
        return outputs

    def render_metrics_and_images(
        self, outputs: Dict[str, torch.Tensor], gt_rgb: torch.Tensor
    ) -> Tuple[Dict[str, float], Dict[str, torch.Tensor]]:
        """Metrics of `rgb` and, when present, `rgb_enhanced` (suffix `_enhanced`) against `gt_rgb`
        [H, W, 3], and the side-by-side images "img" (and "img_enhanced")."""
        metrics: Dict[str, float] = {}
        images = {"img": torch.cat([gt_rgb, outputs["rgb"]], dim=1)}
        for name, suffix in (("rgb", ""), (ENHANCED, "_enhanced")):
            if name in outputs:
                metrics.update({key + suffix: value for key, value in self._image_metrics(outputs[name], gt_rgb).items()})
        if ENHANCED in outputs:
            images["img_enhanced"] = torch.cat([gt_rgb, outputs[ENHANCED]], dim=1)
        return metrics, images

    def _image_metrics(self, prediction: torch.Tensor, target: torch.Tensor) -> Dict[str, float]:
        """PSNR, SSIM as the model computes them, and LPIPS (AlexNet) where its ImageNet weights exist."""
        prediction = torch.moveaxis(prediction, -1, 0)[None]
        target = torch.moveaxis(target, -1, 0)[None]
        metrics = {"psnr": float(self.psnr(target, prediction).item()), "ssim": float(self.ssim(target, prediction))}  # type: ignore[attr-defined]
        lpips = self.lpips(prediction, target)  # type: ignore[attr-defined]
        if lpips is not None:
            metrics["lpips"] = float(lpips.mean())
        return metrics
