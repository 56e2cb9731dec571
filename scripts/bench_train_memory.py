"""Peak memory and step time of Difix fine-tuning (`difix3d train`'s own trainer), printed as JSON.

Runs a few optimizer steps of `DifixTrainer` on a synthetic dataset of the requested size, with
random weights (memory and time do not depend on the values) and no evaluation or checkpoints.
The issue's target: `--model sd-turbo --size 512` with bf16 and batch 1 peaks at <= 20 GB on a GPU.

    python scripts/bench_train_memory.py                       # CUDA: sd-turbo 512 bf16; CPU: tiny 64
    python scripts/bench_train_memory.py --model sd-turbo --size 512 --no-gradient-checkpointing
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch

from difix3d.models.ids import random_weights_name
from difix3d.training.finetune import DifixTrainer, TrainConfig

TARGET_GIB = 20.0


def write_dataset(root: Path, size: int, with_reference: bool) -> Path:
    """Two random pairs of size x size pixels and their JSON."""
    rng = np.random.default_rng(0)
    train = {}
    for index in range(2):
        entry = {}
        for key in ("image", "target_image") + (("ref_image",) if with_reference else ()):
            path = root / f"{key}_{index}.png"
            iio.imwrite(path, rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
            entry[key] = path.name
        train[f"pair{index}"] = entry
    dataset = root / "data.json"
    dataset.write_text(json.dumps({"train": train}))
    return dataset


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd-turbo" if cuda else "tiny", help="tiny or sd-turbo (random weights)")
    parser.add_argument("--size", type=int, default=512 if cuda else 64, help="crop side in pixels")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps (the first allocates AdamW's state)")
    parser.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "bf16", "fp16"])
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--no-reference", action="store_true", help="train without a reference view")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        config = TrainConfig(
            dataset=write_dataset(scratch, args.size, not args.no_reference),
            output=scratch / "out",
            model=random_weights_name(args.model),  # the benchmark measures random weights on purpose
            steps=args.steps,
            crop_size=args.size,
            gram_warmup_steps=0,  # every loss term on: the largest graph
            perceptual_backbone="random",
            mixed_precision=args.mixed_precision,
            gradient_checkpointing=args.gradient_checkpointing,
            eval_every=0,
            log_every=10**9,
        )
        trainer = DifixTrainer(config)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        step_seconds, losses = [], []
        for _ in range(args.steps):
            started = time.perf_counter()
            losses.append(float(trainer.train_step().total))
            if cuda:
                torch.cuda.synchronize()
            step_seconds.append(round(time.perf_counter() - started, 4))

    report = {
        "model": args.model,
        "size": args.size,
        "batch_size": 1,
        "reference": not args.no_reference,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "mixed_precision": trainer.accelerator.mixed_precision,
        "gradient_checkpointing": args.gradient_checkpointing,
        "trainable_parameters_millions": round(sum(p.numel() for p in trainer.optimizer.param_groups[0]["params"]) / 1e6, 2),
        "steps": args.steps,
        "step_seconds": step_seconds,
        "losses": [round(x, 5) for x in losses],
    }
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**30
        report.update(
            peak_allocated_gib=round(peak, 2),
            peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2),
            target_gib=TARGET_GIB,
            within_target=peak <= TARGET_GIB,
        )
    else:
        # Linux reports ru_maxrss in KiB: the process's peak resident memory, model build included.
        report["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    json.dump(report, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
