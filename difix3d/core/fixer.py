"""The one thing the Difix3D steps ask of an image fixer, and Difix's answer to it.

The fix rounds and the Difix3D+ enhancer (`difix3d.core.steps`) call a `Fixer`: rendered images and
their reference views in, fixed images out, all channels-last floats in [0, 1] as 3D hosts render
them. Any single-step fixer that honours this call (e.g. a successor model) plugs in without
touching the hosts; `DifixFixer` adapts this project's `Difix`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Protocol, runtime_checkable

import torch
from torch import Tensor

if TYPE_CHECKING:  # importing the network pulls in diffusers; the core needs only the call
    from difix3d.models.difix import Difix


@runtime_checkable
class Fixer(Protocol):
    """A single-step image fixer."""

    def __call__(self, images: Tensor, references: Optional[Tensor]) -> Tensor:
        """Fix `images` [B, H, W, 3] (float in [0, 1]) given `references` [B, R, H', W', 3] (the
        nearest training images, nearest first) or None; return [B, H, W, 3] in [0, 1] on the
        device of `images`."""
        ...


class DifixFixer:
    """A `Fixer` running a `Difix` on `device`, optionally kept on the CPU between calls."""

    def __init__(self, difix: Difix, device: Optional[str | torch.device] = None, offload: bool = False) -> None:
        """
        Args:
            difix: the network, on the CPU when `offload` is set, else on `device`.
            device: where it runs; default: where it is.
            offload: move it to `device` only for the duration of a call (saves GPU memory between
                fix rounds, costs a transfer per call).
        """
        self.difix = difix
        self.device = torch.device(device) if device is not None else difix.device
        self.offload = offload

    @torch.no_grad()
    def __call__(self, images: Tensor, references: Optional[Tensor]) -> Tensor:
        if self.offload:
            self.difix.to(self.device)
        try:
            # A reference-free model (e.g. nvidia/difix) gets none: it was trained on single views.
            uses_references = references is not None and self.difix.config.reference_views
            refs = references.permute(0, 1, 4, 2, 3).to(images.device) if uses_references else None
            fixed = self.difix.fix(images.permute(0, 3, 1, 2), refs)
        finally:
            if self.offload:
                self.difix.to("cpu")
        return fixed.permute(0, 2, 3, 1)
