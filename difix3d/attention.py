"""Reference-view conditioning: self-attention that runs jointly over all views of a sample.

The UNet sees a batch of `B * V` latents (sample-major: target view first, then its references).
In every transformer block, the self-attention (`attn1`) reshapes its tokens from
`[(B V), N, D]` to `[B, (V N), D]`, so each view attends to the tokens of every view of the same
sample, with the unchanged 2D weights. Cross-attention and feed-forward stay per view. With one
view this is exactly diffusers' default processor.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0


class MultiViewSelfAttnProcessor:
    """Diffusers attention processor for `attn1`: joint self-attention over `num_views` views.

    One instance is shared by every `attn1` of a UNet; the model sets `num_views` before each
    UNet call. With gradient checkpointing the blocks are recomputed during backward, so call
    backward before running the next forward with a different number of views.
    """

    def __init__(self) -> None:
        self.num_views = 1
        self._single_view = AttnProcessor2_0()

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("MultiViewSelfAttnProcessor is for self-attention without a mask (attn1)")
        if self.num_views == 1:
            return self._single_view(attn, hidden_states, temb=temb)
        batch_views, tokens, channels = hidden_states.shape
        if batch_views % self.num_views:
            raise ValueError(f"batch of {batch_views} latents is not a multiple of {self.num_views} views")
        joint = hidden_states.reshape(batch_views // self.num_views, self.num_views * tokens, channels)
        joint = self._single_view(attn, joint, temb=temb)
        return joint.reshape(batch_views, tokens, channels)


def install_multiview_attention(unet: UNet2DConditionModel) -> MultiViewSelfAttnProcessor:
    """Put one shared `MultiViewSelfAttnProcessor` on every `attn1` of `unet`; other
    attention layers keep the default processor. Returns the shared processor."""
    shared = MultiViewSelfAttnProcessor()
    processors = {
        name: shared if name.endswith("attn1.processor") else AttnProcessor2_0()
        for name in unet.attn_processors
    }
    unet.set_attn_processor(processors)
    return shared
