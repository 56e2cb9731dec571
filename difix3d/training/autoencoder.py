"""Autoencoder pretraining of a Difix's VAE, for architectures that have no pretrained weights.

SD-Turbo's VAE arrives pretrained; a Difix built from scratch (`tiny`, `small`) does not, and with a
frozen random encoder and a LoRA-only decoder it could not even reproduce its input. This stage
trains the VAE's encoder, decoder and skip convs as a plain autoencoder (L2 on the posterior mean,
no KL term: the latent is only ever used by Difix's one UNet step) on clean images, and measures
how well it reproduces held-out images. The UNet, the LoRA adapter and the prompt stay untouched.

The latent must carry the image, because the UNet (and with it the reference attention) only ever
sees latents. Trained on the full reproduction alone, the decoder learns to bypass its latent
through the skip convs (measured on the first embedded Difix: its decoder reproduced images at
38.6 dB with the skips and 12.9 dB without them), and the UNet can then hardly change the output.
So the loss has a second L2 term on the reproduction decoded from the latent alone, and at the end
the latent is given unit standard deviation through the VAE's scaling factor, as SD's 0.18215 was
chosen.

That latent-only term is not enough: Difix decodes the UNet's latent with the skip features of the
*broken* input, and a decoder trained only on matching latents and skips follows the skips where they
disagree (measured on 64 held-out pairs: the truth's latent decoded with the broken renders' skips
scored 19.3 dB on inputs of 18.9 dB, so a perfect UNet, and any reference it reads, could add about
0.4 dB). The optional degraded-skip term trains exactly that case on training pairs.

`identity_start` then makes the whole Difix begin as that autoencoder, so fine-tuning learns
corrections to its input instead of first learning to pass it through (a random UNet between a
trained encoder and decoder turns every image into a grey haze that training has to undo).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from difix3d.metrics import psnr
from difix3d.models.difix import Difix, is_adapter_key


@dataclass
class AutoencoderConfig:
    steps: int = 2000
    batch_size: int = 4
    crop: int = 96
    learning_rate: float = 1e-3
    seed: int = 0
    latent_only_weight: float = 1.0
    """Weight of the L2 term on the reproduction decoded from the latent alone (skip features
    dropped); 0 trains the full reproduction only, and the decoder then bypasses the latent."""
    unit_latent: bool = True
    """At the end, set the VAE's scaling factor so that latents have unit standard deviation (False:
    keep SD's 0.18215, which leaves a from-scratch VAE's latents far from unit scale)."""
    degraded_skip_weight: float = 0.0
    """Weight of the L2 term on a clean image decoded from its own latent with the skip features of a
    degraded version of it (a training pair's render; needs `pairs`). Difix decodes the UNet's latent
    with the skips of the broken input: this teaches the decoder to follow the latent where the two
    disagree, so that what the UNet fixes (from a reference too) reaches the output. 0: no such term."""


def autoencoder_parameters(difix: Difix) -> list[torch.nn.Parameter]:
    """The VAE's own weights and its skip convs (not the LoRA adapter)."""
    return [parameter for name, parameter in difix.vae.named_parameters() if "lora_" not in name]


def reconstruct(difix: Difix, images: torch.Tensor, skips: bool = True) -> torch.Tensor:
    """The autoencoder's reproduction of images [N, 3, H, W] in [-1, 1] (H, W multiples of 8);
    with `skips` False, decoded from the latent alone."""
    latents, features = difix.encode(images)
    return difix.decode(latents, features) if skips else decode_latent_only(difix, latents, features)


def decode_latent_only(difix: Difix, latents: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
    """Decode `latents` with the skip features zeroed: what the latent alone carries."""
    return difix.decode(latents, [torch.zeros_like(feature) for feature in features])


def decode_with_degraded_skips(difix: Difix, degraded: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Decode the latent of `clean` with the skip features of `degraded` (both [N, 3, H, W] in [-1, 1]):
    what Difix outputs if its UNet turned the degraded latent into the clean one exactly."""
    latents, _ = difix.encode(clean)
    _, features = difix.encode(degraded)
    return difix.decode(latents, features)


def random_crops(generator: torch.Generator, size: tuple[int, int], count: int, *stacks: torch.Tensor) -> list[torch.Tensor]:
    """The same `count` random items and one random `size` crop of each of `stacks` [N, 3, H, W]."""
    crop_h, crop_w = size
    index = torch.randint(len(stacks[0]), (count,), generator=generator)
    top = int(torch.randint(stacks[0].shape[-2] - crop_h + 1, (1,), generator=generator))
    left = int(torch.randint(stacks[0].shape[-1] - crop_w + 1, (1,), generator=generator))
    return [stack[index, :, top : top + crop_h, left : left + crop_w] for stack in stacks]


def pretrain_autoencoder(
    difix: Difix,
    images: torch.Tensor,
    config: AutoencoderConfig,
    on_log: Callable[[int, float], None] | None = None,
    progress: bool = True,
    checkpoint: Path | None = None,
    checkpoint_every: int = 200,
    pairs: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Difix:
    """Trains `difix`'s VAE on random crops of `images` [N, 3, H, W] in [-1, 1], in place; returns
    it frozen again the way Difix trains (encoder and decoder base fixed, adapters trainable).
    `pairs` (degraded renders, their clean targets; each [M, 3, H, W]) feed the degraded-skip term.

    With `checkpoint` (a file), the run is saved there every `checkpoint_every` steps and continues
    from it when it exists, exactly as if it had not been interrupted."""
    if config.degraded_skip_weight > 0 and pairs is None:
        raise ValueError("degraded_skip_weight > 0 needs pairs (degraded renders and their clean targets)")
    parameters = autoencoder_parameters(difix)
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(config.seed)
    first_step = 0
    if checkpoint is not None and Path(checkpoint).is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        difix.vae.load_state_dict(state["vae"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        first_step = int(state["step"])
    crop_h = min(config.crop, images.shape[-2]) // 8 * 8
    crop_w = min(config.crop, images.shape[-1]) // 8 * 8
    difix.train()
    steps = range(first_step, config.steps)
    for step in tqdm(steps, desc="autoencoder", unit="step", disable=not progress, leave=False, initial=first_step, total=config.steps):
        (batch,) = random_crops(generator, (crop_h, crop_w), config.batch_size, images)
        latents, features = difix.encode(batch)
        loss = F.mse_loss(difix.decode(latents, features), batch)
        if config.latent_only_weight > 0:
            loss = loss + config.latent_only_weight * F.mse_loss(decode_latent_only(difix, latents, features), batch)
        if config.degraded_skip_weight > 0:
            degraded, clean = random_crops(generator, (crop_h, crop_w), config.batch_size, *pairs)
            loss = loss + config.degraded_skip_weight * F.mse_loss(decode_with_degraded_skips(difix, degraded, clean), clean)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = cosine_learning_rate(config.learning_rate, step, config.steps)
        optimizer.step()
        if on_log is not None and (step % 100 == 0 or step == config.steps - 1):
            on_log(step, loss.item())
        if checkpoint is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == config.steps):
            state = {"vae": difix.vae.state_dict(), "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
                     "step": step + 1}  # fmt: skip
            temporary = Path(checkpoint).with_name(f".{Path(checkpoint).name}.tmp")
            torch.save(state, temporary)
            os.replace(temporary, checkpoint)
    for name, parameter in difix.vae.named_parameters():
        parameter.requires_grad_(is_adapter_key(name))
    difix.eval()
    if config.unit_latent:
        normalize_latent_scale(difix, images[:: max(1, len(images) // 64)])
    return difix


def cosine_learning_rate(base: float, step: int, steps: int) -> float:
    """Cosine decay from `base` at step 0 to 0 at `steps`, in closed form: a run resumed with more
    steps continues on the longer curve. (torch's CosineAnnealingLR updates the current rate
    recursively, so a run that had reached its last step stays at 0 whatever its new length.)"""
    return base * 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / steps))


@torch.no_grad()
def normalize_latent_scale(difix: Difix, images: torch.Tensor, batch_size: int = 8) -> float:
    """Set the VAE's scaling factor so that the scaled latents of `images` [N, 3, H, W] (in [-1, 1])
    have unit standard deviation, as SD's was chosen; returns the factor. Reproductions do not
    change (the decoder divides by the same factor); what the UNet sees becomes unit-scale."""
    latents = torch.cat([difix.encode(images[start : start + batch_size])[0] for start in range(0, len(images), batch_size)])
    factor = float(difix.vae.config.scaling_factor / latents.std())
    difix.vae.register_to_config(scaling_factor=factor)
    difix.config.vae["scaling_factor"] = factor
    return factor


@torch.no_grad()
def autoencoder_psnr(difix: Difix, images: torch.Tensor, batch_size: int = 8, skips: bool = True) -> float:
    """Mean PSNR (dB, images in [0, 1]) of the autoencoder's reproductions of `images` [N, 3, H, W]
    in [-1, 1], H and W multiples of 8; with `skips` False, of those decoded from the latent alone."""
    scores = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        output = reconstruct(difix, batch, skips=skips).clamp(-1, 1)
        scores.append(psnr((output + 1) / 2, (batch + 1) / 2))
    return float(torch.cat(scores).mean())


@torch.no_grad()
def degraded_skip_psnr(difix: Difix, degraded: torch.Tensor, clean: torch.Tensor, batch_size: int = 8) -> float:
    """Mean PSNR (dB) against `clean` of `decode_with_degraded_skips`: the best a Difix with this
    autoencoder can do when its UNet is perfect (compare with the PSNR of `degraded` itself)."""
    scores = []
    for start in range(0, len(clean), batch_size):
        output = decode_with_degraded_skips(difix, degraded[start : start + batch_size], clean[start : start + batch_size])
        scores.append(psnr((output.clamp(-1, 1) + 1) / 2, (clean[start : start + batch_size] + 1) / 2))
    return float(torch.cat(scores).mean())


@torch.no_grad()
def identity_start(difix: Difix) -> Difix:
    """Make `difix` (with a pretrained autoencoder) output exactly its autoencoder's reproduction of
    the target, in place: the UNet's last conv is zeroed (so it predicts no noise) and the one-step
    x0 scale 1/sqrt(abar) this leaves on the latent is folded into the decoder's first linear layer.
    Fine-tuning then starts from an image-preserving fixer, the way ControlNet's zero convs start
    from the base model. Returns `difix`."""
    difix.unet.conv_out.weight.zero_()
    if difix.unet.conv_out.bias is not None:
        difix.unet.conv_out.bias.zero_()
    first = difix.vae.post_quant_conv if difix.vae.post_quant_conv is not None else difix.vae.decoder.conv_in
    first.weight.mul_(1.0 / difix.x0_scale)
    difix.config.latent_gain *= difix.x0_scale
    return difix
