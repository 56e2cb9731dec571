"""Score Difix models on a curated dataset's test pairs, per kind of pair: input vs output.

    python scripts/eval_difix_pairs.py --dataset WORK/pairs/dataset.json --model embedded --model OTHER_DIR

The kind of a ground-truth pair is the kind of its pose (`difix3d.data.ground_truth_pairs`): `training`
(a render at a training pose: near-identity), `extreme`, `progressive` (on the way to an extreme
pose) or `wide`; other strategies' pairs count as `other`. Prints a table and, with `--json`, writes
the figures. `--ablations` also scores each model without its reference view and with its UNet
silenced: how much of a fix comes from the reference, and how much from the UNet at all.
`--bands SIGMA` scores each output's low and high frequencies apart (each over the input's other band).
`--on-targets` also runs each model on the clean target itself: how far Difix moves an image that
needs no fix, which bounds what it costs a clean render (a change uncorrelated with a 30 dB render's
error must stay above about 41.7 dB for the render to lose at most 0.3 dB).
"""

from __future__ import annotations

import copy
import functools
import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import tyro
from tqdm.auto import tqdm


@dataclass
class EvalPairs:
    dataset: Path
    """Dataset JSON written by `difix3d curate` (its test split is scored)."""
    model: Annotated[list[str], tyro.conf.UseAppendAction] = field(default_factory=list)
    """A Difix to score (a `load_difix` spec; `embedded` is the packaged one); repeat `--model` to
    compare several (default: embedded)."""
    max_pairs: int = 0
    """Score only the first N test pairs (0: all)."""
    json: Path | None = None
    ablations: bool = False
    """Also score each model "<spec> no ref" (references dropped) and "<spec> UNet off" (the UNet's last
    conv zeroed, so it predicts no noise: what the decoder's adapters and skip convs do alone)."""
    bands: float = 0.0
    """If > 0, also score each model "<spec> low band" (its output's low frequencies over the input's
    high ones; a Gaussian blur of this sigma, in pixels, splits them) and "<spec> high band" (the
    converse): which frequencies a model's gains and costs sit in."""
    on_targets: bool = False
    """Also score each model "<spec> on target": Difix run on the pair's clean target (same reference)
    and scored against that target, so its PSNR measures how far Difix moves an image that needs no fix."""


def pair_kind(pair_id: str) -> str:
    from difix3d.data.ground_truth_pairs import STRATEGY, TRAINING_VIEW_PREFIX

    view = pair_id.rsplit("/", 1)[-1]
    if f"/{STRATEGY}/" not in pair_id:
        return "other"
    if view.startswith(TRAINING_VIEW_PREFIX):
        return "training"
    if re.fullmatch(r"extreme_\d+_at_\d+", view):
        return "progressive"
    return view.split("_", 1)[0]


BANDS = ("low band", "high band")


def band_swaps(output: torch.Tensor, image: torch.Tensor, sigma: float) -> dict[str, torch.Tensor]:
    """`output` keeping only its low frequencies ("low band": over `image`'s high ones) and only its
    high ones ("high band": over `image`'s low ones); a Gaussian blur of `sigma` pixels splits them."""
    from torchvision.transforms.v2.functional import gaussian_blur

    size = 2 * math.ceil(3 * sigma) + 1
    low_output, low_image = (gaussian_blur(x, [size, size], [sigma, sigma]) for x in (output, image))
    swaps = ((low_output + image - low_image), (low_image + output - low_output))
    return {band: swapped.clamp(0, 1) for band, swapped in zip(BANDS, swaps)}


def fix_with(model, image: torch.Tensor, ref: torch.Tensor | None, use_ref: bool) -> torch.Tensor:
    return model.fix(image, refs=ref if use_ref else None)


@torch.no_grad()
def main(settings: EvalPairs) -> dict:
    from difix3d.metrics import LPIPSMetric, image_scores
    from difix3d.models.checkpoint import load_difix
    from difix3d.runtime import configure_cpu_runtime
    from difix3d.training.finetune import load_dataset, load_pair_images

    configure_cpu_runtime(1)
    pairs = load_dataset(settings.dataset)["test"]
    pairs = pairs[: settings.max_pairs] if settings.max_pairs else pairs
    lpips = LPIPSMetric("alex")
    models = {spec: load_difix(spec, device="cpu").eval() for spec in settings.model or ["embedded"]}
    fixers = {spec: functools.partial(fix_with, model, use_ref=True) for spec, model in models.items()}
    if settings.ablations:
        for spec, model in models.items():
            silenced = copy.deepcopy(model)
            torch.nn.init.zeros_(silenced.unet.conv_out.weight)
            torch.nn.init.zeros_(silenced.unet.conv_out.bias)
            fixers[f"{spec} no ref"] = functools.partial(fix_with, model, use_ref=False)
            fixers[f"{spec} UNet off"] = functools.partial(fix_with, silenced, use_ref=True)
    banded = list(models) if settings.bands > 0 else []
    names = ["input", *fixers, *(f"{spec} {band}" for spec in banded for band in BANDS)]
    names += [f"{spec} on target" for spec in models] if settings.on_targets else []
    scores: dict[str, dict[str, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for pair in tqdm(pairs, desc="pairs", unit="pair"):
        image, target, ref = (None if t is None else t[None] for t in load_pair_images(pair))
        outputs = {"input": image.float()}
        for name, fix in fixers.items():
            outputs[name] = fix(image, ref).float().clamp(0, 1)
        for spec in banded:
            for band, swapped in band_swaps(outputs[spec], outputs["input"], settings.bands).items():
                outputs[f"{spec} {band}"] = swapped
        if settings.on_targets:
            for spec in models:
                outputs[f"{spec} on target"] = fixers[spec](target, ref).float().clamp(0, 1)
        for name, output in outputs.items():
            measured = image_scores(output, target, lpips)
            for kind in (pair_kind(pair.id), "all"):
                for metric, number in measured.items():
                    scores[kind][name][metric].append(number)
    summary = {
        kind: {"pairs": len(by_name["input"]["psnr"]),
               **{name: {metric: float(np.mean(values)) for metric, values in metrics.items()} for name, metrics in by_name.items()}}
        for kind, by_name in sorted(scores.items())
    }  # fmt: skip
    print(f"{'pairs':<12} {'n':>4}  " + "  ".join(f"{name[-28:]:>28}" for name in names))
    for kind, row in summary.items():
        cells = [f"{row[name]['psnr']:.2f} / {row[name]['ssim']:.3f} / {row[name].get('lpips', float('nan')):.3f}" for name in names]
        print(f"{kind:<12} {row['pairs']:>4}  " + "  ".join(f"{cell:>28}" for cell in cells))
    if settings.json is not None:
        settings.json.write_text(json.dumps({"dataset": settings.dataset.name, "models": names[1:], "summary": summary}, indent=1))
    return summary


if __name__ == "__main__":
    main(tyro.cli(EvalPairs))
