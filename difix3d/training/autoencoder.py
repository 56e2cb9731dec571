"""Autoencoder pretraining of a Difix's VAE, for architectures that have no pretrained weights.

SD-Turbo's VAE arrives pretrained; a Difix built from scratch (`tiny`, `small`) does not, and with a
frozen random encoder and a LoRA-only decoder it could not even reproduce its input. This stage
trains the VAE's encoder, decoder and skip convs as a plain autoencoder (L2 on the posterior mean,
no KL term: the latent is only ever used by Difix's one UNet step) on clean images, and measures
how well it reproduces held-out images. The UNet, the LoRA adapter and the prompt stay untouched.

`identity_start` then makes the whole Difix begin as that autoencoder, so fine-tuning learns
corrections to its input instead of first learning to pass it through (a random UNet between a
trained encoder and decoder turns every image into a grey haze that training has to undo).
"""

from __future__ import annotations

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


def autoencoder_parameters(difix: Difix) -> list[torch.nn.Parameter]:
    """The VAE's own weights and its skip convs (not the LoRA adapter)."""
    return [parameter for name, parameter in difix.vae.named_parameters() if "lora_" not in name]


def reconstruct(difix: Difix, images: torch.Tensor) -> torch.Tensor:
    """The autoencoder's reproduction of images [N, 3, H, W] in [-1, 1] (H, W multiples of 8)."""
    return difix.decode(*difix.encode(images))


def pretrain_autoencoder(
    difix: Difix,
    images: torch.Tensor,
    config: AutoencoderConfig,
    on_log: Callable[[int, float], None] | None = None,
    progress: bool = True,
    checkpoint: Path | None = None,
    checkpoint_every: int = 200,
) -> Difix:
    """Trains `difix`'s VAE on random crops of `images` [N, 3, H, W] in [-1, 1], in place; returns
    it frozen again the way Difix trains (encoder and decoder base fixed, adapters trainable).

    With `checkpoint` (a file), the run is saved there every `checkpoint_every` steps and continues
    from it when it exists, exactly as if it had not been interrupted."""
    parameters = autoencoder_parameters(difix)
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.steps)
    generator = torch.Generator().manual_seed(config.seed)
    first_step = 0
    if checkpoint is not None and Path(checkpoint).is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        difix.vae.load_state_dict(state["vae"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        # A resumed run may be given another step count: the cosine schedule then ends at the new
        # last step (its closed form continues smoothly from the saved learning rate).
        schedule.T_max = config.steps
        generator.set_state(state["generator"])
        first_step = int(state["step"])
    crop_h = min(config.crop, images.shape[-2]) // 8 * 8
    crop_w = min(config.crop, images.shape[-1]) // 8 * 8
    difix.train()
    steps = range(first_step, config.steps)
    for step in tqdm(steps, desc="autoencoder", unit="step", disable=not progress, leave=False, initial=first_step, total=config.steps):
        index = torch.randint(len(images), (config.batch_size,), generator=generator)
        top = int(torch.randint(images.shape[-2] - crop_h + 1, (1,), generator=generator))
        left = int(torch.randint(images.shape[-1] - crop_w + 1, (1,), generator=generator))
        batch = images[index, :, top : top + crop_h, left : left + crop_w]
        loss = F.mse_loss(reconstruct(difix, batch), batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if on_log is not None and (step % 100 == 0 or step == config.steps - 1):
            on_log(step, loss.item())
        if checkpoint is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == config.steps):
            state = {"vae": difix.vae.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                     "generator": generator.get_state(), "step": step + 1}  # fmt: skip
            temporary = Path(checkpoint).with_name(f".{Path(checkpoint).name}.tmp")
            torch.save(state, temporary)
            os.replace(temporary, checkpoint)
    for name, parameter in difix.vae.named_parameters():
        parameter.requires_grad_(is_adapter_key(name))
    return difix.eval()


@torch.no_grad()
def autoencoder_psnr(difix: Difix, images: torch.Tensor, batch_size: int = 8) -> float:
    """Mean PSNR (dB, images in [0, 1]) of the autoencoder's reproductions of `images` [N, 3, H, W]
    in [-1, 1], H and W multiples of 8."""
    scores = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        output = reconstruct(difix, batch).clamp(-1, 1)
        scores.append(psnr((output + 1) / 2, (batch + 1) / 2))
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
    return difix
