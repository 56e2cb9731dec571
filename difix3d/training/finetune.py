"""Fine-tuning Difix on (degraded render, clean target, reference) pairs: `difix3d train`.

Dataset: a JSON file in the reference release's format,
`{"train": {ID: {"image", "target_image", "ref_image", "prompt"}}, "test": {...}}`, with
`ref_image` optional (but present for all pairs of a split or for none) and relative paths taken
from the JSON's folder. Every file is checked before training starts. Size rule: the degraded input
defines the size; a target or reference of another size but the same aspect ratio (within 1%) is
resized to it (bilinear, antialiased) and logged; a different aspect ratio is refused. The `prompt`
field is accepted but not used: Difix keeps its fixed prompt embedding.

Training (defaults as in the reference release): the UNet fully and the VAE decoder's LoRA and skip
convs (`Difix.trainable_parameters`); loss L2 + LPIPS + Gram (`difix3d.training.losses.DifixLoss`); AdamW
(lr 2e-5, weight decay 1e-2), grad-norm clip 1.0; the same random crop of input, reference and
target. `accelerate` places devices, runs mixed precision (bf16 on GPUs that support it) and
distributes: `accelerate launch -m difix3d.cli train ...` runs one process per GPU (and node), and
`torchrun` on a machine without GPUs runs CPU processes (gloo), the same code path.

Several processes: each takes its own pairs of every step (`StreamSampler`: no pair twice per
epoch), gradients are averaged, and only the main process writes files (checkpoints, evaluation,
TensorBoard, final model and card), logs and shows progress; the others wait at barriers.

Output folder: `checkpoints/step-XXXXXXXX/` (trainable weights, optimizer, step, every process's RNG
state as JSON, and with `--ema-decay` the moving average of the weights; written to a temporary
folder and renamed, so a crash never leaves a half checkpoint; on multi-node runs the folder must be
on a shared file system), `eval/step-XXXXXXXX.png` grids
(input | output | target | reference), `eval/metrics.jsonl`, `tensorboard/`, and at the end the model
itself (`save_pretrained`, loadable with `load_difix(OUTPUT)`) with its model card `README.md`.
`--resume` continues bit for bit when run with the same number of processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import imageio.v3 as iio
import numpy as np
import torch
import torch.nn.functional as F
import tyro
from safetensors.torch import load_file, save_file

from difix3d.errors import Difix3DError
from difix3d.imagenet_weights import describe, find_imagenet_weights
from difix3d.images import load_image, save_image
from difix3d.metrics import LPIPSMetric, image_scores
from difix3d.models.ids import DEFAULT_BASE
from difix3d.training.losses import GRAM_LAYER_WEIGHTS, DifixLoss, L2Form, LossTerms

logger = logging.getLogger(__name__)

_ASPECT_TOLERANCE = 0.01
_MAX_MISSING_LISTED = 5
_GRID_TILE_HEIGHT = 256
RNG_STATES_FILE = "rng_states.json"
EMA_FILE = "ema.safetensors"


@dataclass
class TrainConfig:
    """Settings of `difix3d train` (defaults: the reference release's recipe)."""

    dataset: Path
    """Dataset JSON: {"train": {ID: {image, target_image, ref_image?, prompt?}}, "test": {...}}."""
    output: Path
    """Output folder: checkpoints, evaluation grids, TensorBoard logs, final model and model card."""
    model: str = "nvidia/difix_ref"
    """Starting model: a hub id, a difix3d folder, a release .pkl, "embedded" (the packaged Difix), or "random-tiny-architecture" (random, for tests)."""
    base: Annotated[str, tyro.conf.arg(aliases=("--base-model",))] = DEFAULT_BASE
    """Only for a release .pkl: the SD-Turbo (hub id or folder) its weights apply to (`--base`, as in
    `difix3d fix`; `--base-model` is its old name)."""
    steps: int = 10_000
    """Total optimizer steps (with --resume: the step to stop at, counted from the start)."""
    batch_size: int = 1
    """Pairs per step per process."""
    crop_size: int = 512
    """Side of the random square crop (reduced to the smallest training image, multiple of 8)."""
    learning_rate: float = 2e-5
    unet_learning_rate: float | None = None
    """The UNet's learning rate (None: --learning-rate). A UNet whose last conv starts at zero (the
    identity start of from-scratch architectures) learns slowly next to the decoder's adapters."""
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    ema_decay: float = 0.0
    """If > 0: keep an exponential moving average of the trained weights (diffusers' `EMAModel` at
    this constant decay, from the first step: a fine-tune starts from good weights), and evaluate and
    save it instead of the last step's weights; it averages about the last 1 / (1 - decay) steps and
    holds one more copy of the trained weights in device memory. 0: the last step's weights (the
    release's recipe). A batch-1 run's weights wander from step to step; their average sits nearer
    the middle (not in the paper)."""
    lambda_l2: float = 1.0
    l2_form: L2Form = "mse"
    """"mse": the paper's L2. "log-mse": each image's log10 MSE (-PSNR/10), which weighs a pair by the
    inverse of its own error, so nearly clean renders count as much as broken ones (not in the paper;
    see difix3d.training.losses). Its gradient on an 18 dB pair is about 7x that of the MSE: pair it
    with a smaller --lambda-l2 (0.15 keeps broken pairs' weight)."""
    lambda_lpips: float = 1.0
    lambda_gram: float = 1.0
    """Gram (style) loss weight (the paper's formula uses 0.5, the release 1.0)."""
    gram_warmup_steps: int = 2000
    """The Gram loss is switched on after this many steps."""
    lambda_latent: float = 0.0
    """L2 between the UNet's predicted latent and the target image's latent (not in the paper; for
    small from-scratch Difixes whose decoder follows the input's skips, see difix3d.training.losses)."""
    residual_output: bool = False
    """Train (and save) the model with residual output (`DifixConfig.residual_output`): the input plus
    the change its decoder makes when the UNet changes the latent, so what the UNet leaves alone stays
    exactly as it was (not the release's architecture). A model saved that way keeps it without the flag."""
    perceptual_backbone: Literal["pretrained", "random"] = "pretrained"
    """VGG-16 for LPIPS and Gram: ImageNet weights (required unless "random", for tests only)."""
    vgg16_weights: Path | None = None
    """torchvision VGG-16 weights file (default: $DIFIX3D_VGG16_WEIGHTS, the torch hub cache, then the
    weights fetched by `difix3d weights`; see difix3d.imagenet_weights)."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """"auto": bf16 on GPUs that support it, else full precision."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, about 30% slower)."""
    checkpoint_every: int = 1000
    """Write a checkpoint every N steps (and at the last step)."""
    keep_checkpoints: int = 2
    """How many of the latest checkpoints to keep."""
    eval_every: int = 1000
    """Evaluate on the test split every N steps (and at the last step); 0: never."""
    eval_max_pairs: int = 32
    """Test pairs used per evaluation (the first ones, in JSON order)."""
    eval_lpips_net: Literal["alex", "vgg"] = "alex"
    """Backbone of the evaluation's LPIPS: AlexNet (the paper's metric) or VGG-16."""
    grid_rows: int = 4
    """Test pairs shown in each evaluation grid."""
    log_every: int = 10
    """Log losses to TensorBoard every N steps."""
    resume: bool = False
    """Continue from the latest checkpoint in OUTPUT."""
    seed: int = 0
    """Seed of the data order, crops and any other randomness (per process: seed + rank)."""
    num_workers: int = 0
    """DataLoader worker processes for image loading."""


@dataclass
class Pair:
    """One training example; paths are absolute."""

    id: str
    image: Path
    target: Path
    ref: Path | None
    prompt: str | None
    size: tuple[int, int]  # (H, W) of the degraded input


@dataclass
class TrainResult:
    """What a `train` call did: the total loss of each step it ran (first_step is 1-based)."""

    first_step: int
    losses: list[float]
    final_step: int
    evaluations: list[dict[str, Any]] = field(default_factory=list)


# --------------------------------------------------------------------------------------- dataset


def load_dataset(path: Path) -> dict[str, list[Pair]]:
    """Read and validate a dataset JSON: every file exists and sizes follow the module's rule.

    Returns {"train": [...], "test": [...]} (test may be empty). Raises Difix3DError naming the
    first missing files (all of them are checked before anything else happens).
    """
    path = Path(path)
    if not path.is_file():
        raise Difix3DError(f"dataset JSON not found: {path}")
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise Difix3DError(f"dataset {path} is not valid JSON: {error}") from None
    if not isinstance(content, dict) or not isinstance(content.get("train"), dict) or not content["train"]:
        raise Difix3DError(f'dataset {path} needs a non-empty "train" object of ID -> {{image, target_image, ...}}')
    root = path.parent
    entries: dict[str, list[tuple[str, dict]]] = {}
    for split in ("train", "test"):
        items = content.get(split) or {}
        if not isinstance(items, dict):
            raise Difix3DError(f'dataset {path}: "{split}" must be an object of ID -> pair')
        for pair_id, entry in items.items():
            if not isinstance(entry, dict) or not entry.get("image") or not entry.get("target_image"):
                raise Difix3DError(f'dataset {path}: {split}/{pair_id} needs "image" and "target_image"')
        entries[split] = list(items.items())

    def resolve(name: str) -> Path:
        candidate = Path(name).expanduser()
        return candidate if candidate.is_absolute() else root / candidate

    missing = [
        f"{split}/{pair_id} {key}: {resolve(entry[key])}"
        for split, items in entries.items()
        for pair_id, entry in items
        for key in ("image", "target_image", "ref_image")
        if entry.get(key) and not resolve(entry[key]).is_file()
    ]
    if missing:
        listed = "; ".join(missing[:_MAX_MISSING_LISTED])
        more = f" (and {len(missing) - _MAX_MISSING_LISTED} more)" if len(missing) > _MAX_MISSING_LISTED else ""
        raise Difix3DError(f"dataset {path}: {len(missing)} missing file(s): {listed}{more}")

    splits: dict[str, list[Pair]] = {}
    for split, items in entries.items():
        with_ref = [pair_id for pair_id, entry in items if entry.get("ref_image")]
        if with_ref and len(with_ref) != len(items):
            without = next(pair_id for pair_id, entry in items if not entry.get("ref_image"))
            raise Difix3DError(
                f"dataset {path}: {split} mixes pairs with and without ref_image ({with_ref[0]} has one, "
                f"{without} has none); give every pair of a split a reference, or none"
            )
        pairs = []
        for pair_id, entry in items:
            image = resolve(entry["image"])
            pair = Pair(
                id=pair_id,
                image=image,
                target=resolve(entry["target_image"]),
                ref=resolve(entry["ref_image"]) if entry.get("ref_image") else None,
                prompt=entry.get("prompt"),
                size=_image_size(image),
            )
            for other in (pair.target, pair.ref):
                if other is not None:
                    _check_aspect(pair, other, _image_size(other))
            pairs.append(pair)
        splits[split] = pairs
    return splits


def _image_size(path: Path) -> tuple[int, int]:
    # Decoded in full, not just its header: a truncated or foreign file fails here, before training.
    height, width = load_image(path).shape[:2]
    return int(height), int(width)


def _check_aspect(pair: Pair, other: Path, other_size: tuple[int, int]) -> None:
    if other_size == pair.size:
        return
    aspect, other_aspect = pair.size[1] / pair.size[0], other_size[1] / other_size[0]
    if abs(other_aspect / aspect - 1) > _ASPECT_TOLERANCE:
        raise Difix3DError(
            f"pair {pair.id}: {other} is {other_size[0]}x{other_size[1]} but the input {pair.image} is "
            f"{pair.size[0]}x{pair.size[1]}; sizes may differ only by a scale (same aspect ratio)"
        )
    logger.info("pair %s: %s (%dx%d) is resized to the input's %dx%d", pair.id, other.name, *other_size, *pair.size)


def load_pair_images(pair: Pair) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(input, target, reference or None) as [3, H, W] float tensors in [0, 1], all at the input's size."""
    image = _to_tensor(load_image(pair.image))
    target = _resize_to(_to_tensor(load_image(pair.target)), pair.size)
    ref = None if pair.ref is None else _resize_to(_to_tensor(load_image(pair.ref)), pair.size)
    return image, target, ref


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)


def _resize_to(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(image.shape[-2:]) == size:
        return image
    return F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)


class CropDataset(torch.utils.data.Dataset):
    """Random crops addressed by their position in the training stream, not by pair index.

    Position p (0, 1, 2, ...) picks pair `permutation(epoch)[p % N]` and a crop offset from a
    generator seeded by (seed, p): the stream is a pure function of the seed, so resuming at any
    step replays exactly the crops an uninterrupted run would have drawn.
    """

    def __init__(self, pairs: list[Pair], crop: tuple[int, int], seed: int):
        self.pairs, self.crop, self.seed = pairs, crop, seed
        self._permutations: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.pairs)

    def _pair_at(self, position: int) -> Pair:
        epoch, index = divmod(position, len(self.pairs))
        if epoch not in self._permutations:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._permutations = {epoch: torch.randperm(len(self.pairs), generator=generator)}
        return self.pairs[int(self._permutations[epoch][index])]

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        pair = self._pair_at(position)
        image, target, ref = load_pair_images(pair)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * position + 1)
        crop_h, crop_w = self.crop
        top = int(torch.randint(pair.size[0] - crop_h + 1, (1,), generator=generator))
        left = int(torch.randint(pair.size[1] - crop_w + 1, (1,), generator=generator))
        views = [image] if ref is None else [image, ref]
        window = (slice(None), slice(top, top + crop_h), slice(left, left + crop_w))
        return {
            "views": torch.stack([view[window] for view in views]) * 2 - 1,  # [V, 3, h, w] in [-1, 1]
            "target": target[window] * 2 - 1,
        }


class StreamSampler(torch.utils.data.Sampler):
    """This process's positions in the global stream, from step `start_step` on, forever.

    Global step s uses positions s*B*P ... (s+1)*B*P - 1; process r takes its B consecutive ones.
    """

    def __init__(self, start_step: int, batch_size: int, process_index: int, num_processes: int):
        self.start_step, self.batch_size = start_step, batch_size
        self.process_index, self.num_processes = process_index, num_processes

    def __iter__(self):
        step = self.start_step
        while True:
            first = (step * self.num_processes + self.process_index) * self.batch_size
            yield from range(first, first + self.batch_size)
            step += 1


def effective_crop(pairs: list[Pair], crop_size: int) -> tuple[int, int]:
    """The crop (h, w): `crop_size` limited by the smallest training image, rounded down to a multiple of 8."""
    min_h, min_w = min(p.size[0] for p in pairs), min(p.size[1] for p in pairs)
    crop = (min(crop_size, min_h) // 8 * 8, min(crop_size, min_w) // 8 * 8)
    if 0 in crop:
        raise Difix3DError(f"training images must be at least 8x8 pixels (smallest: {min_h}x{min_w})")
    if crop != (crop_size, crop_size):
        logger.info("crop reduced from %d to %dx%d to fit the smallest training image (%dx%d)", crop_size, *crop, min_h, min_w)
    return crop


# --------------------------------------------------------------------------------------- trainer


class DifixTrainer:
    """The training loop, in pieces a benchmark can drive: `train_step()`, `evaluate()`, `save_checkpoint()`.

    `run()` does the whole job. Build it in every process of an `accelerate launch` run.
    """

    def __init__(self, config: TrainConfig):
        from accelerate import Accelerator

        self.config = config
        _check_config(config)
        self.output = Path(config.output)
        self.checkpoint_dir = self.output / "checkpoints"
        self.splits = load_dataset(config.dataset)  # validates everything before any heavy work
        resume_from = self._checkpoint_to_resume()

        self.accelerator = Accelerator(cpu=_cpu_only(), mixed_precision=_mixed_precision(config.mixed_precision))
        self.device = self.accelerator.device
        _seed_everything(config.seed + self.accelerator.process_index)
        self.loss_fn = DifixLoss(
            lambda_l2=config.lambda_l2,
            lambda_lpips=config.lambda_lpips,
            lambda_gram=config.lambda_gram,
            gram_warmup_steps=config.gram_warmup_steps,
            perceptual_backbone=config.perceptual_backbone,
            vgg16_weights=config.vgg16_weights,
            lambda_latent=config.lambda_latent,
            l2_form=config.l2_form,
        ).to(self.device)

        from difix3d.models.checkpoint import load_difix

        model = load_difix(config.model, device=self.device, dtype=torch.float32, base=config.base)
        if self.splits["train"][0].ref is not None and not model.config.reference_views:
            # The saved model must say it now uses references (its config records how it was trained).
            logger.info("%s was trained without reference views; this training adds them", config.model)
            model.config.reference_views = True
        if config.residual_output:
            model.config.residual_output = True
        if config.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        self.trainable_names = _trainable_names(model)
        self._warn_about_prompts(model)
        # fused AdamW on CUDA: one kernel, no temporary copies of the optimizer state.
        # Two groups, the UNet's parameters first (as `trainable_parameters` yields them), then the decoder's adapters.
        unet = list(model.unet.parameters())
        in_unet = {id(parameter) for parameter in unet}
        adapters = [parameter for parameter in model.trainable_parameters() if id(parameter) not in in_unet]
        optimizer = torch.optim.AdamW(
            [{"params": params, "lr": lr} for params, lr in zip((unet, adapters), self._learning_rates())],
            weight_decay=config.weight_decay,
            fused=self.device.type == "cuda",
        )
        self.step = 0
        if resume_from is not None:
            self.step = self._load_checkpoint(resume_from, model, optimizer)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        # The trained parameters by name, in the model's order (the same objects for the whole run).
        unwrapped = self.accelerator.unwrap_model(self.model)
        self.trained = [(name, parameter) for name, parameter in unwrapped.named_parameters() if name in self.trainable_names]
        self.ema = self._make_ema(resume_from)

        self.crop = effective_crop(self.splits["train"], config.crop_size)
        dataset = CropDataset(self.splits["train"], self.crop, config.seed)
        sampler = StreamSampler(self.step, config.batch_size, self.accelerator.process_index, self.accelerator.num_processes)
        # An own generator keeps the loader from drawing on the global RNG (restored on resume).
        self.loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=config.batch_size,
            sampler=sampler,
            num_workers=config.num_workers,
            generator=torch.Generator().manual_seed(config.seed),
            pin_memory=self.device.type == "cuda",
        )
        self._batches = iter(self.loader)
        if resume_from is not None:
            self._restore_rng(resume_from)
        evaluates = self._is_main and config.eval_every > 0 and self.splits["test"]
        self.lpips_metric = None
        if evaluates:
            lpips_weights = config.vgg16_weights if config.eval_lpips_net == "vgg" else None
            self.lpips_metric = LPIPSMetric(config.eval_lpips_net, lpips_weights, self.device)
        self.writer = self._tensorboard_writer()

    @property
    def _is_main(self) -> bool:
        return self.accelerator.is_main_process

    # --------------------------------------------------------------------------- one step

    def train_step(self) -> LossTerms:
        """One optimizer step on the next batch; returns the loss terms (averaged over processes)."""
        batch = next(self._batches)
        views = batch["views"].to(self.device, non_blocking=True)
        target = batch["target"].to(self.device, non_blocking=True)
        self.model.train()
        latents = {}
        if self.config.lambda_latent > 0:
            prediction, latents["predicted_latent"] = self.model(views, return_latent=True)
            latents["target_latent"] = self.accelerator.unwrap_model(self.model).target_latent(target)
        else:
            prediction = self.model(views)
        with self.accelerator.autocast():
            terms = self.loss_fn(prediction, target, step=self.step, **latents)
        self.accelerator.backward(terms.total)
        grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step([parameter for _, parameter in self.trained])
        self.step += 1
        names = [f.name for f in dataclasses.fields(LossTerms)]
        reduced = LossTerms(**{n: self.accelerator.reduce(getattr(terms, n).detach().float(), "mean") for n in names})
        if self.writer is not None and self.step % max(self.config.log_every, 1) == 0:
            for name in names:
                self.writer.add_scalar(f"loss/{name}", float(getattr(reduced, name)), self.step)
            self.writer.add_scalar("train/grad_norm", float(grad_norm), self.step)
        return reduced

    # --------------------------------------------------------------------------- whole run

    def run(self) -> TrainResult:
        """Train up to `config.steps`, checkpointing and evaluating on schedule; save the final model."""
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        config = self.config
        result = TrainResult(first_step=self.step + 1, losses=[], final_step=self.step)
        progress = tqdm(
            total=config.steps, initial=self.step, desc="difix3d train", unit="step", disable=not self._is_main, dynamic_ncols=True
        )
        with logging_redirect_tqdm():  # log lines above the bar, not through it
            while self.step < config.steps:
                terms = self.train_step()
                loss = float(terms.total)
                if not math.isfinite(loss):
                    raise Difix3DError(f"training diverged: loss {loss} at step {self.step} (try a lower --learning-rate)")
                result.losses.append(loss)
                progress.update(1)
                progress.set_postfix(loss=f"{loss:.4f}")
                last = self.step == config.steps
                if config.eval_every and (self.step % config.eval_every == 0 or last):
                    result.evaluations.append(self.evaluate())
                if (config.checkpoint_every and self.step % config.checkpoint_every == 0) or last:
                    self.save_checkpoint()
        progress.close()
        result.final_step = self.step
        self.save_model(result)
        return result

    # --------------------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """PSNR/SSIM (+ LPIPS when its weights are present) on the first test pairs, a grid PNG and logs,
        of the weights that will be saved (the moving average with `--ema-decay`).

        Runs on the main process; the others wait. Returns the metrics (empty without a test split).
        """
        metrics: dict[str, Any] = {}
        pairs = self.splits["test"][: self.config.eval_max_pairs]
        if self._is_main and pairs:
            with self._weights_to_save():
                metrics = self._evaluate_pairs(pairs)
        self.accelerator.wait_for_everyone()
        return metrics

    def _evaluate_pairs(self, pairs: list[Pair]) -> dict[str, Any]:
        """Scores, grid and logs of `pairs` (main process only)."""
        model = self.accelerator.unwrap_model(self.model)
        model.eval()
        # The input's scores too: a Difix is only worth its difference to what it was given.
        scores: dict[str, list[float]] = {f"{prefix}{name}": [] for prefix in ("", "input_") for name in ("psnr", "ssim", "lpips")}
        rows = []
        for pair in pairs:
            image, target, ref = (None if t is None else t[None].to(self.device) for t in load_pair_images(pair))
            with self.accelerator.autocast():
                output = model.fix(image, refs=ref).float().clamp(0, 1)
            for prefix, scored in (("", output), ("input_", image.float())):
                for name, value in image_scores(scored, target, self.lpips_metric).items():
                    scores[f"{prefix}{name}"].append(value)
            if len(rows) < self.config.grid_rows:
                rows.append([image, output, target, ref])
        metrics = {"step": self.step, "pairs": len(pairs), "lpips_net": self.config.eval_lpips_net}
        metrics.update({name: float(np.mean(values)) for name, values in scores.items() if values})
        grid_path = self.output / "eval" / f"step-{self.step:08d}.png"
        save_image(grid_path, _grid(rows))
        with (self.output / "eval" / "metrics.jsonl").open("a") as log:
            log.write(json.dumps(metrics) + "\n")
        if self.writer is not None:
            for name in ("psnr", "ssim", "lpips", "input_psnr", "input_ssim", "input_lpips"):
                if name in metrics:
                    self.writer.add_scalar(f"eval/{name}", metrics[name], self.step)
            self.writer.add_image("eval/grid", iio.imread(grid_path), self.step, dataformats="HWC")
        logger.info("step %d eval: %s", self.step, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
        return metrics

    # --------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self) -> Path:
        """Write checkpoints/step-N atomically from the main process (into a temporary folder,
        then renamed) with every process's RNG state, then prune old checkpoints; the others wait."""
        from accelerate.utils import gather_object

        final = self.checkpoint_dir / f"step-{self.step:08d}"
        rng_states = gather_object([_rng_state()])  # in process order, on every process
        if self._is_main:
            staging = self.checkpoint_dir / f".tmp-step-{self.step:08d}"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            trainable = {name: parameter.detach().contiguous() for name, parameter in self.trained}
            save_file(trainable, staging / "trainable.safetensors")
            if self.ema is not None:
                save_file({name: shadow.contiguous() for (name, _), shadow in zip(self.trained, self.ema.shadow_params)},
                          staging / EMA_FILE)  # fmt: skip
            torch.save(self.optimizer.state_dict(), staging / "optimizer.pt")
            if self.accelerator.scaler is not None:
                torch.save(self.accelerator.scaler.state_dict(), staging / "grad_scaler.pt")
            (staging / RNG_STATES_FILE).write_text(json.dumps({"processes": rng_states}))
            state = {"step": self.step, "model": self.config.model, "num_processes": self.accelerator.num_processes,
                     "ema_updates": None if self.ema is None else self.ema.optimization_step}  # fmt: skip
            (staging / "state.json").write_text(json.dumps(state, indent=2))
            shutil.rmtree(final, ignore_errors=True)
            staging.rename(final)
            for old in _checkpoints(self.checkpoint_dir)[: -max(self.config.keep_checkpoints, 1)]:
                shutil.rmtree(old)
            logger.info("checkpoint written: %s", final)
        self.accelerator.wait_for_everyone()
        return final

    def _checkpoint_to_resume(self) -> Path | None:
        existing = _checkpoints(self.checkpoint_dir)
        if self.config.resume:
            if not existing:
                raise Difix3DError(f"--resume: no checkpoint in {self.checkpoint_dir}")
            return existing[-1]
        if existing:
            raise Difix3DError(
                f"{self.output} already holds checkpoints (latest {existing[-1].name}); "
                "pass --resume to continue, or choose another --output"
            )
        return None

    def _make_ema(self, resume_from: Path | None):
        """The moving average of the trained weights (`--ema-decay`), resumed with the run; or None."""
        if self.config.ema_decay <= 0:
            return None
        from diffusers.training_utils import EMAModel

        decay = self.config.ema_decay
        ema = EMAModel([parameter for _, parameter in self.trained], decay=decay, min_decay=decay)  # constant decay: no warm-up
        if resume_from is None:
            return ema
        if not (resume_from / EMA_FILE).is_file():
            logger.info("%s holds no moving average of the weights: the average starts from its weights", resume_from)
            return ema
        saved = load_file(resume_from / EMA_FILE)
        ema.shadow_params = [saved[name].to(parameter.device) for name, parameter in self.trained]
        ema.optimization_step = int(json.loads((resume_from / "state.json").read_text())["ema_updates"])
        return ema

    @contextlib.contextmanager
    def _weights_to_save(self):
        """Within the block the model holds the weights that are evaluated and saved: the moving
        average with `--ema-decay`, else the last step's; training's own weights come back after it."""
        if self.ema is None:
            yield
            return
        parameters = [parameter for _, parameter in self.trained]
        self.ema.store(parameters)
        self.ema.copy_to(parameters)
        try:
            yield
        finally:
            self.ema.restore(parameters)

    def _learning_rates(self) -> tuple[float, float]:
        """(the UNet's, the decoder adapters') learning rates: the optimizer's two parameter groups."""
        unet = self.config.learning_rate if self.config.unet_learning_rate is None else self.config.unet_learning_rate
        return unet, self.config.learning_rate

    def _load_checkpoint(self, directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
        state = json.loads((directory / "state.json").read_text())
        if state["model"] != self.config.model:
            raise Difix3DError(f"--resume: {directory} was trained from --model {state['model']}, not {self.config.model}")
        if state["num_processes"] != self.accelerator.num_processes:
            logger.warning(
                "resuming a %d-process run with %d processes: data order and random states change from here on "
                "(a resume is exact only with the same number of processes)",
                state["num_processes"],
                self.accelerator.num_processes,
            )
        trainable = load_file(directory / "trainable.safetensors")  # on the CPU; copied into the parameters below
        missing = sorted(self.trainable_names - set(trainable))
        if missing:
            raise Difix3DError(f"--resume: {directory} lacks trainable weights, e.g. {', '.join(missing[:3])}")
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name in self.trainable_names:
                    parameter.copy_(trainable[name])
        # Read to the CPU (a process's device may be "cpu:N", which torch.load cannot map to);
        # load_state_dict moves the state next to its parameters.
        saved = torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True)
        if len(saved["param_groups"]) == 1:  # saved before the UNet had its own group: the UNet's parameters came first
            (group,) = saved["param_groups"]
            unet_count = len(optimizer.param_groups[0]["params"])
            saved["param_groups"] = [{**group, "params": group["params"][:unet_count]}, {**group, "params": group["params"][unet_count:]}]
        optimizer.load_state_dict(saved)
        # The optimizer state carries the earlier run's learning rates and weight decay: this run's flags win.
        wanted = [(lr, self.config.weight_decay) for lr in self._learning_rates()]
        earlier = [(group["lr"], group["weight_decay"]) for group in optimizer.param_groups]
        if earlier != wanted:
            logger.info("resuming with (learning rate, weight decay) %s for the UNet and the decoder's adapters (the checkpoint's run: %s)",
                        wanted, earlier)  # fmt: skip
        for group, (lr, decay) in zip(optimizer.param_groups, wanted):
            group.update(lr=lr, weight_decay=decay)
        if self.accelerator.scaler is not None and (directory / "grad_scaler.pt").is_file():
            self.accelerator.scaler.load_state_dict(torch.load(directory / "grad_scaler.pt", weights_only=True))
        logger.info("resumed from %s (step %d)", directory, state["step"])
        return int(state["step"])

    def _restore_rng(self, directory: Path) -> None:
        """This process's RNG states from the checkpoint (JSON: nothing in it can run code)."""
        path = directory / RNG_STATES_FILE
        if not path.is_file():
            logger.warning("%s has no %s: continuing with fresh random states", directory, RNG_STATES_FILE)
            return
        try:
            states = json.loads(path.read_text())["processes"]
            # Another process count was warned about in _load_checkpoint: that run is no replay anyway.
            if len(states) == self.accelerator.num_processes:
                _set_rng_state(states[self.accelerator.process_index], self.device)
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as error:  # JSON errors are ValueErrors
            raise Difix3DError(f"--resume: {path} holds no valid RNG state: {error}") from None

    # --------------------------------------------------------------------------- final model

    def save_model(self, result: TrainResult) -> None:
        """Save the trained model into the output folder (`save_pretrained`) with its model card."""
        from difix3d.models.checkpoint import save_pretrained  # diffusers: imported when a model is saved, not by `difix3d --help`

        self.accelerator.wait_for_everyone()
        if self._is_main:
            with self._weights_to_save():
                save_pretrained(self.accelerator.unwrap_model(self.model), self.output)
            (self.output / "README.md").write_text(self._model_card(result))
            logger.info("model saved to %s", self.output)
        if self.writer is not None:
            self.writer.close()
        self.accelerator.wait_for_everyone()

    def _model_card(self, result: TrainResult) -> str:
        config = self.config
        train, test = self.splits["train"], self.splits["test"]
        if config.perceptual_backbone == "random":
            backbone = "**RANDOM (untrained) VGG-16** — asked for explicitly; LPIPS and Gram terms are not perceptual"
        elif config.lambda_lpips > 0 or config.lambda_gram > 0:
            weights = find_imagenet_weights("vgg", config.vgg16_weights)  # its file name: no machine path
            backbone = f"ImageNet VGG-16 (`{weights.name if weights else 'weights not found'}`)"
        else:
            backbone = "not used"
        last_eval = next((e for e in reversed(result.evaluations) if e), None)
        metrics = (
            ", ".join(f"{name.upper()} {last_eval[name]:.4f} (input {last_eval['input_' + name]:.4f})"
                      for name in ("psnr", "ssim", "lpips") if name in last_eval)  # fmt: skip
            + f" (step {last_eval['step']}, {last_eval['pairs']} test pairs)"
            if last_eval
            else "no evaluation (no test split, or --eval-every 0)"
        )
        if last_eval and "lpips" in last_eval:
            metrics += f"; LPIPS v0.1 with {describe(config.eval_lpips_net)} ImageNet features"
        elif last_eval:
            metrics += f"; LPIPS n/a: {self.lpips_metric.unavailable_reason}"
        layer_weights = ", ".join(f"{w:.4g}" for w in GRAM_LAYER_WEIGHTS)
        if self.accelerator.unwrap_model(self.model).config.residual_output:
            output = "residual: the input plus decode(fixed latent) − decode(unchanged latent)"
        else:
            output = "the decoder's image (the release's)"
        return f"""# Difix fine-tuned with difix3d

Load this folder with `difix3d.models.checkpoint.load_difix(FOLDER)` or `difix3d fix --model FOLDER ...`.
Paths are relative to this folder.

- **Started from**: `{self._card_path(config.model)}`
- **Data**: `{self._card_path(config.dataset)}` — {len(train)} training pairs, {len(test)} test pairs, \
{"with" if train[0].ref is not None else "without"} reference views
- **Steps**: {result.final_step} × batch {config.batch_size} × {self.accelerator.num_processes} process(es); \
random {self.crop[0]}x{self.crop[1]} crops
- **Processes**: {self.accelerator.num_processes}; effective batch size {config.batch_size * self.accelerator.num_processes} \
pairs per step ({config.batch_size} per process)
- **Weights**: {"the last step's" if self.ema is None else f"exponential moving average of the trained weights, decay {config.ema_decay:g} (about the last {round(1 / (1 - config.ema_decay)):,} steps; {self.ema.optimization_step:,} updates)"}
- **Optimizer**: AdamW, lr {config.learning_rate:g}{"" if config.unet_learning_rate is None else f" (UNet {config.unet_learning_rate:g})"}, weight decay {config.weight_decay:g}, grad-norm clip {config.max_grad_norm:g}
- **Precision**: {"fp32" if self.accelerator.mixed_precision == "no" else self.accelerator.mixed_precision + " mixed precision"}; gradient checkpointing {"on" if config.gradient_checkpointing else "off"}
- **Trained**: UNet (all weights), VAE decoder LoRA and skip convs; VAE encoder frozen
- **Output**: {output}
- **Loss**: {config.lambda_l2:g}·{"L2" if config.l2_form == "mse" else "log10 L2 (per image)"} + {config.lambda_lpips:g}·LPIPS(VGG) + {config.lambda_gram:g}·Gram \
(VGG-16 relu1_2…relu5_3, layer weights {layer_weights}; on after {config.gram_warmup_steps} steps){f" + {config.lambda_latent:g}·L2 of the UNet's latent to the target's" if config.lambda_latent > 0 else ""}
- **Perceptual backbone**: {backbone}
- **Evaluation**: {metrics}
- **Final training loss**: {f"{result.losses[-1]:.4f}" if result.losses else "n/a"}
"""

    def _card_path(self, location: str | Path) -> str:
        """A file or folder as the model card records it: relative to the card's folder (a model id as is)."""
        if not Path(location).exists():
            return str(location)
        return Path(os.path.relpath(Path(location).absolute(), self.output.absolute())).as_posix()

    # --------------------------------------------------------------------------- helpers

    def _tensorboard_writer(self):
        if not self._is_main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            logger.info("tensorboard is not installed: no TensorBoard logs")
            return None
        return SummaryWriter(log_dir=str(self.output / "tensorboard"))

    def _warn_about_prompts(self, model: torch.nn.Module) -> None:
        prompts = {p.prompt for split in self.splits.values() for p in split if p.prompt}
        other = sorted(prompts - {model.config.prompt})
        if other:
            logger.warning("the dataset's prompts (e.g. %r) are ignored: Difix uses its fixed prompt %r", other[0], model.config.prompt)


def train(config: TrainConfig) -> TrainResult:
    """Fine-tune Difix as `config` says (see the module docstring); returns this call's losses."""
    return DifixTrainer(config).run()


def train_command(config: Annotated[TrainConfig, tyro.conf.OmitArgPrefixes]) -> None:
    """Fine-tune Difix on (degraded, clean, reference) pairs from a dataset JSON.

    Runs on CPU or one GPU as is; for several GPUs or nodes: `accelerate launch -m difix3d.cli train ...`.
    """
    from accelerate import PartialState

    # Under `accelerate launch` / `torchrun` only the main process talks: the others keep errors only.
    if PartialState(cpu=_cpu_only()).is_main_process:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    else:
        logging.disable(logging.WARNING)
        warnings.simplefilter("ignore")
    started = time.time()
    result = train(config)
    logger.info("trained to step %d in %.0f s; model and card in %s", result.final_step, time.time() - started, config.output)


# --------------------------------------------------------------------------------------- helpers


def _check_config(config: TrainConfig) -> None:
    positive = {"steps": config.steps, "batch_size": config.batch_size, "crop_size": config.crop_size}
    for name, value in positive.items():
        if value < 1:
            raise Difix3DError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if config.learning_rate <= 0:
        raise Difix3DError(f"--learning-rate must be positive, got {config.learning_rate}")
    if config.unet_learning_rate is not None and config.unet_learning_rate <= 0:
        raise Difix3DError(f"--unet-learning-rate must be positive, got {config.unet_learning_rate}")
    if min(config.lambda_l2, config.lambda_lpips, config.lambda_gram, config.lambda_latent) < 0:
        raise Difix3DError("loss weights (--lambda-*) must not be negative")
    if not 0 <= config.ema_decay < 1:
        raise Difix3DError(f"--ema-decay must be in [0, 1) (0: no moving average), got {config.ema_decay}")


def _cpu_only() -> bool:
    """Without CUDA, tell accelerate so: it then joins `torchrun` processes with gloo (else each
    process would train alone and write the same files)."""
    return not torch.cuda.is_available()


def _mixed_precision(choice: str) -> str:
    if choice != "auto":
        if choice != "no" and not torch.cuda.is_available():
            raise Difix3DError(f"--mixed-precision {choice} needs a CUDA GPU; use 'no' on CPU")
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def _trainable_names(model: torch.nn.Module) -> set[str]:
    trainable = {id(p) for p in model.trainable_parameters()}
    return {name for name, parameter in model.named_parameters() if id(parameter) in trainable}


def _checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of interrupted writes are ignored)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("step-*") if (p / "state.json").is_file())


def _rng_state() -> dict[str, Any]:
    """This process's Python, NumPy, torch (and CUDA) RNG states as plain JSON values."""
    version, internal, gauss_next = random.getstate()
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss_next],
        "numpy": [kind, keys.tolist(), int(position), int(has_gauss), float(cached_gaussian)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [device_state.tolist() for device_state in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Inverse of `_rng_state`."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _grid(rows: list[list[torch.Tensor | None]]) -> np.ndarray:
    """Rows of (input, output, target, reference) [1,3,H,W] tensors -> one HxWx3 image; a missing
    reference is a grey tile. Every tile is scaled to the first input's size, capped in height."""
    height, width = rows[0][0].shape[-2:]
    scale = min(1.0, _GRID_TILE_HEIGHT / height)
    tile = (max(1, round(height * scale)), max(1, round(width * scale)))
    grey = torch.full((1, 3, *tile), 0.5)
    lines = []
    for row in rows:
        tiles = [grey if t is None else F.interpolate(t.float().cpu(), size=tile, mode="bilinear", antialias=True) for t in row]
        lines.append(torch.cat(tiles, dim=-1))
    grid = torch.cat(lines, dim=-2)[0].clamp(0, 1)
    return grid.permute(1, 2, 0).numpy()
