"""The reference release's call shape, for users who know it:

    pipe = DifixPipeline.from_pretrained("nvidia/difix_ref")
    fixed = pipe("remove degradation", image=render, ref_image=ref, num_inference_steps=1,
                 timesteps=[199], guidance_scale=0.0).images[0]

A thin wrapper around `Difix.fix`; arguments that the single-step model cannot honour (another
prompt, more steps, guidance) are errors rather than silently ignored.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from difix3d.errors import Difix3DError
from difix3d.images import to_batch, to_uint8
from difix3d.models.checkpoint import load_difix
from difix3d.models.difix import Difix
from difix3d.models.ids import DEFAULT_BASE


@dataclass
class DifixPipelineOutput:
    """`images`: a list of PIL images ("pil") or float HxWx3 arrays ("np"), or a [B,3,H,W] tensor ("pt")."""

    images: list[Image.Image] | list[np.ndarray] | torch.Tensor


class DifixPipeline:
    """Diffusers-style front end of a `Difix`."""

    def __init__(self, difix: Difix) -> None:
        self.difix = difix

    @classmethod
    def from_pretrained(
        cls,
        spec: str | os.PathLike,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        base: str | os.PathLike = DEFAULT_BASE,
    ) -> DifixPipeline:
        """Load with `difix3d.models.checkpoint.load_difix` (hub id, folder, release .pkl, "random-tiny-architecture")."""
        return cls(load_difix(spec, device=device, dtype=dtype, base=base))

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> DifixPipeline:
        self.difix.to(device=device, dtype=dtype)
        return self

    def __call__(
        self,
        prompt: str | None = None,
        image: Any = None,
        ref_image: Any = None,
        num_inference_steps: int = 1,
        timesteps: list[int] | None = None,
        guidance_scale: float = 0.0,
        output_type: Literal["pil", "np", "pt"] = "pil",
    ) -> DifixPipelineOutput:
        """Fix `image` (one image or a list) with optional `ref_image` (one per image, or a list per image)."""
        config = self.difix.config
        if image is None:
            raise Difix3DError("DifixPipeline needs image=...")
        if prompt not in (None, config.prompt):
            raise Difix3DError(f"this Difix only knows the prompt {config.prompt!r} (it is stored encoded), got {prompt!r}")
        if num_inference_steps != 1 or (timesteps is not None and list(timesteps) != [config.timestep]):
            raise Difix3DError(f"Difix is a single-step model at timestep {config.timestep}")
        if guidance_scale:
            raise Difix3DError("Difix runs without classifier-free guidance (guidance_scale=0)")
        images = image if isinstance(image, (list, tuple)) else [image]
        refs = ref_image if isinstance(ref_image, (list, tuple)) and len(images) > 1 else [ref_image] * len(images)
        if len(refs) != len(images):
            raise Difix3DError(f"{len(images)} images but {len(refs)} references")
        fixed = [self.difix.fix(to_batch(img)[0], None if ref is None else to_batch(ref)[0]) for img, ref in zip(images, refs)]
        if output_type == "pt":
            return DifixPipelineOutput(images=torch.cat(fixed))
        arrays = [batch[0].permute(1, 2, 0).cpu().numpy() for batch in fixed]
        if output_type == "np":
            return DifixPipelineOutput(images=arrays)
        return DifixPipelineOutput(images=[Image.fromarray(to_uint8(a)) for a in arrays])
