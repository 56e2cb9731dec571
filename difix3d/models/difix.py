"""The Difix network: SD-Turbo's UNet and VAE, run as a single denoising step.

A degraded image is encoded and used directly as the noisy latent at timestep 199 (no noise is
added); one UNet evaluation gives the x0 prediction, which the VAE decoder turns back into an image.
The decoder receives four encoder->decoder skip connections (1x1 convs) and is LoRA-tuned; the
encoder is frozen; the UNet is fully trainable. References are extra views that the UNet's
self-attention sees jointly with the target (see `difix3d.models.attention`); only the target is decoded.

Loading and saving live in `difix3d.models.checkpoint`; `Difix.from_config(name)` is the only way to get
random weights.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from torch import nn
from torch.utils.checkpoint import checkpoint

from difix3d.errors import Difix3DError
from difix3d.models.attention import install_multiview_attention
from difix3d.models.ids import PROMPT

logger = logging.getLogger(__name__)

LORA_ADAPTER = "vae_skip"
# Decoder layers that get a LoRA adapter, by their last name component (the release's list).
_LORA_LAYER_NAMES = ("conv1", "conv2", "conv_in", "conv_shortcut", "conv", "conv_out", "to_q", "to_k", "to_v")

# Stable Diffusion 2.1 layout, as in stabilityai/sd-turbo.
_SD_TURBO_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
    "norm_num_groups": 32,
}
_SD_TURBO_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 768,
    "scaling_factor": 0.18215,
}
# Same block types and depth of VAE (so four skips and a factor-8 latent), a few MB in all.
_TINY_UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "attention_head_dim": 8,
    "cross_attention_dim": 32,
    "use_linear_projection": True,
    "norm_num_groups": 8,
}
_TINY_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [16, 32, 32, 32],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 64,
    "scaling_factor": 0.18215,
}
# Between the two (4.5M parameters, 18 MB): the embedded Difix's architecture, trained from scratch
# on the CPU (scripts/train_embedded_difix.py); twice tiny's width everywhere, two UNet levels.
_SMALL_UNET = {**_TINY_UNET, "block_out_channels": [64, 128]}
_SMALL_VAE = {**_TINY_VAE, "block_out_channels": [32, 64, 64, 64]}
# `small` with a 16-channel latent (as SD3's VAE has), 4x the information per latent pixel: the tiny
# decoder reproduces images from a 4-channel latent at only ~19 dB, so its skips carry the picture and
# what the UNet changes in the latent (a reference's content included) barely reaches the output.
_SMALL_16CH_UNET = {**_SMALL_UNET, "in_channels": 16, "out_channels": 16}
_SMALL_16CH_VAE = {**_SMALL_VAE, "latent_channels": 16}
NAMED_ARCHITECTURES = {
    "sd-turbo": (_SD_TURBO_UNET, _SD_TURBO_VAE),
    "small": (_SMALL_UNET, _SMALL_VAE),
    "small-16ch": (_SMALL_16CH_UNET, _SMALL_16CH_VAE),
    "tiny": (_TINY_UNET, _TINY_VAE),
}


@dataclass
class DifixConfig:
    """Everything needed to build a Difix (weights aside); saved as JSON next to the weights."""

    unet: dict[str, Any]  # UNet2DConditionModel arguments
    vae: dict[str, Any]  # AutoencoderKL arguments
    architecture: str = "custom"  # "sd-turbo", "tiny" or "custom": for messages only
    prompt: str = PROMPT
    prompt_length: int = 77  # CLIP's context length: the prompt embedding is [1, 77, cross_attention_dim]
    timestep: int = 199
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085  # SD's scaled-linear schedule
    beta_end: float = 0.012
    lora_rank: int = 4
    lora_alpha: float = 8.0  # peft's default: the LoRA update is scaled by alpha / rank
    lora_target_modules: list[str] | None = None  # VAE module names; None: every decoder conv/attention + skips
    skip_init: float = 1e-5
    gamma: float = 1.0  # scale of the skip connections
    ignore_skip: bool = False  # the release's switch: True decodes without the skip connections
    # Trained with reference views (Difix-ref: joint self-attention over target and references).
    # False (nvidia/difix): given references, the target is fixed alone, as if each view were
    # processed independently -- what the reference release's plain UNet does.
    reference_views: bool = True
    # What the decoder's input is, in units of encoder latents: 1, or the one-step x0 scale once
    # `difix3d.training.autoencoder.identity_start` folded its inverse into the decoder. The latent
    # a training target should give (`Difix.target_latent`) is its encoder latent times this.
    latent_gain: float = 1.0
    # False (the release): the image is the decoder's output. True: the input plus the change the
    # decoder makes when the UNet changes the latent, decode(fixed) - decode(unchanged): a latent the
    # UNet leaves alone leaves the image exactly as it was, autoencoder error included.
    residual_output: bool = False

    @classmethod
    def named(cls, name: str) -> DifixConfig:
        """The config of a named architecture: "sd-turbo" (SD 2.1 layout), "small" or "tiny"."""
        if name not in NAMED_ARCHITECTURES:
            raise Difix3DError(f"unknown Difix architecture {name!r}; known: {', '.join(NAMED_ARCHITECTURES)}")
        unet, vae = NAMED_ARCHITECTURES[name]
        return cls(unet=copy.deepcopy(unet), vae=copy.deepcopy(vae), architecture=name)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DifixConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise Difix3DError(f"Difix config has unknown fields: {', '.join(unknown)}")
        return cls(**values)


def alphas_cumprod(config: DifixConfig) -> torch.Tensor:
    """Cumulative alpha products of SD's scaled-linear schedule, in float64."""
    betas = torch.linspace(
        config.beta_start**0.5, config.beta_end**0.5, config.num_train_timesteps, dtype=torch.float64, device="cpu"
    ) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def skip_channels(vae: AutoencoderKL) -> list[tuple[int, int]]:
    """(in, out) channels of each skip conv, deepest first.

    Skip k takes the input of encoder down block n-1-k and feeds the input of decoder up block k;
    both sit at the same resolution. Encoder block inputs have channels c0, c0, c1, ..., c(n-2);
    decoder block inputs have c(n-1), c(n-1), c(n-2), ..., c1 (c = the VAE's block_out_channels).
    """
    channels = list(vae.config.block_out_channels)
    encoder_inputs = [channels[0]] + channels[:-1]
    reversed_channels = channels[::-1]
    decoder_inputs = [reversed_channels[0]] + reversed_channels[:-1]
    return list(zip(encoder_inputs[::-1], decoder_inputs))


def default_lora_targets(vae: AutoencoderKL) -> list[str]:
    """Names of the decoder layers that get LoRA: every conv, the attention projections, the skips."""
    targets = []
    for name, module in vae.named_modules():
        if not name.startswith("decoder."):
            continue
        last = name.rsplit(".", 1)[-1]
        is_skip = last.startswith("skip_conv_")
        if isinstance(module, (nn.Conv2d, nn.Linear)) and (
            last in _LORA_LAYER_NAMES or name.endswith("to_out.0") or is_skip
        ):
            targets.append(name)
    return targets


def is_adapter_key(key: str) -> bool:
    """Whether a state-dict key belongs to Difix's additions to the VAE (LoRA or skip convs)."""
    return "lora_" in key or "skip_conv_" in key


class Difix(nn.Module):
    """Single-step, reference-conditioned image fixer (Difix / Difix-ref).

    Attributes: `unet` (diffusers UNet2DConditionModel), `vae` (diffusers AutoencoderKL whose
    decoder carries `skip_conv_1..n` and a peft LoRA adapter named "vae_skip"), buffer
    `prompt_embeds` ([1, prompt_length, cross_attention_dim], the encoded prompt).
    Build with `Difix.from_config(...)` (random weights) or `difix3d.models.checkpoint.load_difix(...)`.
    """

    def __init__(self, config: DifixConfig) -> None:
        super().__init__()
        self.config = config = copy.deepcopy(config)
        self.unet = UNet2DConditionModel(**config.unet)
        self.vae = AutoencoderKL(**config.vae)
        for index, (in_channels, out_channels) in enumerate(skip_channels(self.vae), start=1):
            setattr(self.vae.decoder, f"skip_conv_{index}", nn.Conv2d(in_channels, out_channels, 1, bias=False))
        if config.lora_target_modules is None:
            config.lora_target_modules = default_lora_targets(self.vae)
        lora = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            init_lora_weights="gaussian",
            target_modules=list(config.lora_target_modules),
        )
        self.vae.add_adapter(lora, adapter_name=LORA_ADAPTER)
        install_multiview_attention(self.unet)
        cross_dim = self.unet.config.cross_attention_dim
        self.register_buffer("prompt_embeds", torch.zeros(1, config.prompt_length, cross_dim))

        abar = alphas_cumprod(config)[config.timestep]
        # x0 = (z - sqrt(1 - abar) * eps) / sqrt(abar): DDPM's step at t with a one-step schedule.
        self._x0_eps_scale = math.sqrt(1.0 - abar.item())
        self._x0_scale = 1.0 / math.sqrt(abar.item())
        self.gamma = config.gamma
        self.gradient_checkpointing = False
        self._logged: set[str] = set()
        self.reset_adapters()
        self._freeze()

    # ----------------------------------------------------------------------------- construction

    @classmethod
    def from_config(cls, config: str | DifixConfig, seed: int = 0) -> Difix:
        """A Difix with random weights ("tiny", "sd-turbo" or a DifixConfig), reproducible by `seed`.

        Random weights are only useful for tests and timing; the prompt embedding is random too.
        """
        config = DifixConfig.named(config) if isinstance(config, str) else config
        logger.warning("Difix %r built with RANDOM weights (for tests and timing only)", config.architecture)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            difix = cls(config)
            difix.prompt_embeds.normal_()
        return difix

    def reset_adapters(self) -> None:
        """Initialise the skip convs (constant `skip_init`) and the LoRA adapter (gaussian A, zero B)."""
        for conv in self.skip_convs():
            nn.init.constant_(conv.get_base_layer().weight, self.config.skip_init)
        for module in self.vae.modules():
            if isinstance(module, LoraLayer):
                module.reset_lora_parameters(LORA_ADAPTER, "gaussian")

    def _freeze(self) -> None:
        self.unet.requires_grad_(True)
        for name, parameter in self.vae.named_parameters():
            parameter.requires_grad_(is_adapter_key(name))

    def skip_convs(self) -> list[nn.Module]:
        """The skip convs, deepest first (LoRA-wrapped)."""
        decoder = self.vae.decoder
        return [getattr(decoder, f"skip_conv_{i}") for i in range(1, len(decoder.up_blocks) + 1)]

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters the training optimizer should update: all of the UNet, the decoder's LoRA
        and the skip convs. Everything else (encoder, decoder base weights) is frozen."""
        yield from self.unet.parameters()
        for name, parameter in self.vae.named_parameters():
            if is_adapter_key(name):
                yield parameter

    def enable_gradient_checkpointing(self) -> None:
        """Recompute UNet and decoder activations in backward instead of storing them."""
        self.unet.enable_gradient_checkpointing()
        self.gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        self.unet.disable_gradient_checkpointing()
        self.gradient_checkpointing = False

    @property
    def device(self) -> torch.device:
        return self.prompt_embeds.device

    @property
    def dtype(self) -> torch.dtype:
        return self.prompt_embeds.dtype

    # ----------------------------------------------------------------------------- network

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Images [N,3,H,W] in [-1,1] (H, W multiples of 8) -> scaled latents (posterior mean)
        and the skip features (the input of each encoder down block, shallowest first).

        The posterior mean makes the output deterministic; the reference release samples it.
        """
        encoder = self.vae.encoder
        hidden = encoder.conv_in(images)
        skips = []
        for block in encoder.down_blocks:
            skips.append(hidden)
            hidden = block(hidden)
        hidden = encoder.mid_block(hidden)
        hidden = encoder.conv_out(encoder.conv_act(encoder.conv_norm_out(hidden)))
        if self.vae.quant_conv is not None:
            hidden = self.vae.quant_conv(hidden)
        mean = hidden.chunk(2, dim=1)[0]
        return mean * self.vae.config.scaling_factor, skips

    def denoise(self, latents: torch.Tensor, num_views: int) -> torch.Tensor:
        """One UNet step at `config.timestep`: noisy latents [(B V),C,h,w] -> x0 prediction."""
        # Processors a user set on the UNet since construction get wrapped too (a no-op otherwise).
        install_multiview_attention(self.unet)
        timestep = torch.full((latents.shape[0],), self.config.timestep, device=latents.device, dtype=torch.long)
        prompt = self.prompt_embeds.expand(latents.shape[0], -1, -1)
        eps = self.unet(
            latents, timestep, encoder_hidden_states=prompt, cross_attention_kwargs={"num_views": num_views}
        ).sample
        return (latents - self._x0_eps_scale * eps) * self._x0_scale

    def decode(self, latents: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        """Scaled latents + the same view's skip features -> images in [-1,1] (not clamped)."""
        hidden = latents / self.vae.config.scaling_factor
        if self.vae.post_quant_conv is not None:
            hidden = self.vae.post_quant_conv(hidden)
        decoder = self.vae.decoder
        hidden = decoder.conv_in(hidden)
        hidden = self._maybe_checkpoint(decoder.mid_block, hidden)
        for block, skip_conv, skip in zip(decoder.up_blocks, self.skip_convs(), reversed(skips)):
            if not self.config.ignore_skip:
                hidden = hidden + skip_conv(skip) * self.gamma
            hidden = self._maybe_checkpoint(block, hidden)
        return decoder.conv_out(decoder.conv_act(decoder.conv_norm_out(hidden)))

    @property
    def x0_scale(self) -> float:
        """1/sqrt(abar) at the model's timestep: what a zero noise prediction multiplies latents by."""
        return self._x0_scale

    def _log_once(self, level: int, message: str) -> None:
        if message not in self._logged:
            self._logged.add(message)
            logger.log(level, message, self.config.architecture)

    def _maybe_checkpoint(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, hidden, use_reentrant=False)
        return block(hidden)

    @torch.no_grad()
    def target_latent(self, images: torch.Tensor) -> torch.Tensor:
        """Images [N,3,H,W] in [-1,1] -> the latent the UNet should output for them to be decoded
        (their encoder latent times `config.latent_gain`): the target of a latent-space loss."""
        return self.encode(images)[0] * self.config.latent_gain

    def forward(self, views: torch.Tensor, return_latent: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Views [B,V,3,H,W] in [-1,1] (view 0 the target, then references; H, W multiples of 8)
        -> the fixed target [B,3,H,W], clamped to [-1,1]. Differentiable (for training).
        `return_latent`: also return the UNet's output for the target, [B,C,h,w] (what is decoded).

        A model trained without references (`config.reference_views` False) fixes the target alone:
        its references are dropped (logged once), which gives what processing every view
        independently gives, at a fraction of the cost."""
        if views.ndim != 5 or views.shape[2] != 3:
            raise Difix3DError(f"Difix expects views [B,V,3,H,W], got {list(views.shape)}")
        if views.shape[1] > 1 and not self.config.reference_views:
            self._log_once(
                logging.WARNING,
                "this Difix (%s) was trained without reference views: references are ignored, each target is fixed alone",
            )
            views = views[:, :1]
        elif views.shape[1] == 1 and self.config.reference_views:
            self._log_once(logging.INFO, "this Difix (%s) was trained with reference views and runs without one")
        batch, num_views, _, height, width = views.shape
        if height % 8 or width % 8:
            raise Difix3DError(f"Difix.forward needs H and W multiples of 8, got {height}x{width} (fix() pads)")
        with torch.no_grad():  # the encoder is frozen; its outputs need no graph
            latents, skips = self.encode(views.flatten(0, 1))
        # Only the target view is decoded: keep its skip features, drop the rest.
        target_skips = [skip.unflatten(0, (batch, num_views))[:, 0].contiguous() for skip in skips]
        del skips
        clean = self.denoise(latents, num_views)
        target = clean.unflatten(0, (batch, num_views))[:, 0]
        image = self.decode(target, target_skips)
        if self.config.residual_output:
            unchanged = latents.unflatten(0, (batch, num_views))[:, 0] * self.config.latent_gain
            image = views[:, 0] + image - self.decode(unchanged, target_skips)
        image = image.clamp(-1.0, 1.0)
        return (image, target) if return_latent else image

    # ----------------------------------------------------------------------------- inference

    @torch.inference_mode()
    def fix(self, images: Any, refs: Any = None, batch_size: int = 4) -> Any:
        """Fix rendered images, optionally with reference views.

        `images`: a tensor [B,3,H,W] or [3,H,W] in [0,1] (float or uint8), a numpy array
        [B,H,W,3] or [H,W,3] (uint8, uint16 or float in [0,1]), a PIL image or a list of them.
        `refs`: per image, one or more references of the same kinds: a tensor [B,3,H,W] or
        [B,R,3,H,W] (or [3,H,W] / [R,3,H,W] for a single image), numpy likewise with channels
        last, a PIL image / list per image. References of another size are resized to the image's.
        Any H and W (padded to a multiple of 8, cropped back; the content is not resampled).
        Runs in chunks of `batch_size` on the model's device and dtype; returns what it was
        given (type, shape, dtype, device).
        """
        from difix3d.images import to_batch, to_ref_batch

        batch, restore = to_batch(images)
        ref_batch = None if refs is None else to_ref_batch(refs, batch)
        outputs = []
        for start in range(0, batch.shape[0], batch_size):
            views = batch[start : start + batch_size, None]
            if ref_batch is not None:
                views = torch.cat([views, ref_batch[start : start + batch_size]], dim=1)
            outputs.append(self._fix_views(views))
        return restore(torch.cat(outputs))

    def _fix_views(self, views: torch.Tensor) -> torch.Tensor:
        """[B,V,3,H,W] in [0,1] on any device -> [B,3,H,W] in [0,1], float32, on the input's device."""
        height, width = views.shape[-2:]
        pad_h, pad_w = -height % 8, -width % 8
        flat = views.flatten(0, 1).to(self.device, self.dtype) * 2 - 1
        flat = F.pad(flat, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else flat
        fixed = self(flat.unflatten(0, views.shape[:2]))
        return ((fixed[..., :height, :width].float() + 1) / 2).to(views.device)
