"""Reference-view conditioning: self-attention that runs jointly over all views of a sample.

The UNet sees a batch of `B * V` latents (sample-major: target view first, then its references).
In every transformer block, the self-attention (`attn1`) reshapes its tokens from
`[(B V), N, D]` to `[B, (V N), D]`, so each view attends to the tokens of every view of the same
sample, with the unchanged 2D weights. Cross-attention and feed-forward stay per view. With one
view this is exactly the wrapped processor.

The number of views travels with each UNet call, as diffusers' `cross_attention_kwargs`
(`unet(..., cross_attention_kwargs={"num_views": V})`), so no state is shared between calls and
gradient checkpointing recomputes blocks with the view count of their own forward pass.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention


class MultiViewAttnProcessor:
    """Wraps a diffusers attention processor (whichever was installed) and accepts `num_views`.

    On a self-attention layer (`joint=True`, the `attn1` of each transformer block) the wrapped
    processor runs once over the tokens of all views of a sample; on other layers `num_views` is
    accepted and dropped, so diffusers does not warn about an unexpected argument.
    """

    def __init__(self, inner: Any, joint: bool) -> None:
        self.inner = inner
        self.joint = joint

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        num_views: int = 1,
        **kwargs: Any,
    ) -> torch.Tensor:
        if not self.joint or num_views == 1:
            return self.inner(
                attn, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask, **kwargs
            )
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("joint multi-view attention is for self-attention without a mask (attn1)")
        batch_views, tokens, channels = hidden_states.shape
        if batch_views % num_views:
            raise ValueError(f"batch of {batch_views} latents is not a multiple of {num_views} views")
        joint = hidden_states.reshape(batch_views // num_views, num_views * tokens, channels)
        joint = self.inner(attn, joint, **kwargs)
        return joint.reshape(batch_views, tokens, channels)


def install_multiview_attention(unet: UNet2DConditionModel) -> None:
    """Wrap every attention processor of `unet` in a `MultiViewAttnProcessor` (joint on `attn1`).

    The processors already installed (diffusers' default, or one a user set) stay in charge of the
    attention itself; layers already wrapped are left as they are, so calling this again is cheap.
    """
    processors = unet.attn_processors
    if all(isinstance(processor, MultiViewAttnProcessor) for processor in processors.values()):
        return
    unet.set_attn_processor(
        {
            name: processor
            if isinstance(processor, MultiViewAttnProcessor)
            else MultiViewAttnProcessor(processor, joint=name.endswith("attn1.processor"))
            for name, processor in processors.items()
        }
    )
