"""nerfstudio's Trainer, with checkpoints that an interrupted run can always resume from.

nerfstudio 1.1.5 writes `step-N.ckpt` in place, so a run killed while saving (a fix round saves
right after its Difix pass) leaves an empty or truncated newest checkpoint, and `--load-dir` then
fails on it with a bare `EOFError`. Here checkpoints are written to a temporary file and renamed,
and `--load-dir` resumes from the newest complete checkpoint, skipping (and naming) broken ones.

It also applies the training process's CPU settings (an entry point's choice: ns-render, ns-eval and
the viewer keep their own).
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Type

import torch
from nerfstudio.engine.trainer import Trainer, TrainerConfig
from nerfstudio.utils.decorators import check_main_thread
from nerfstudio.utils.rich_utils import CONSOLE

from difix3d.errors import Difix3DError
from difix3d.files import atomic_open
from difix3d.runtime import configure_cpu_runtime

CHECKPOINT_NAME = re.compile(r"step-(\d+)\.ckpt")


def is_complete_checkpoint(path: Path) -> bool:
    """torch.save writes a zip archive whose directory comes last: an interrupted write has none."""
    return path.is_file() and zipfile.is_zipfile(path)


def latest_complete_step(load_dir: Path) -> int:
    """The step of the newest complete `step-N.ckpt` in `load_dir`; broken newer ones are skipped with a note."""
    if not load_dir.is_dir():
        raise Difix3DError(f"--load-dir {load_dir} is not a folder")
    steps = sorted(
        (int(match.group(1)) for match in map(CHECKPOINT_NAME.fullmatch, (p.name for p in load_dir.iterdir())) if match),
        reverse=True,
    )
    for step in steps:
        path = load_dir / f"step-{step:09d}.ckpt"
        if is_complete_checkpoint(path):
            return step
        CONSOLE.log(f"[yellow]Skipping {path}: empty or truncated (a save that was interrupted)")
    raise Difix3DError(f"--load-dir {load_dir} holds no complete checkpoint (step-N.ckpt)")


@dataclass
class Difix3DTrainerConfig(TrainerConfig):
    _target: Type = field(default_factory=lambda: Difix3DTrainer)
    cpu_threads: int = 1
    """PyTorch threads when training on the CPU (0: PyTorch's default); see
    `difix3d.runtime.configure_cpu_runtime`."""


class Difix3DTrainer(Trainer):
    config: Difix3DTrainerConfig

    def setup(self, test_mode: Literal["test", "val", "inference"] = "val") -> None:
        if self.device == "cpu":
            configure_cpu_runtime(self.config.cpu_threads)
        super().setup(test_mode)

    def _load_checkpoint(self) -> None:
        if self.config.load_dir is not None and self.config.load_step is None:
            self.config.load_step = latest_complete_step(Path(self.config.load_dir))
        elif self.config.load_checkpoint is not None and not is_complete_checkpoint(Path(self.config.load_checkpoint)):
            raise Difix3DError(
                f"--load-checkpoint {self.config.load_checkpoint} is missing, empty or truncated; "
                "name an earlier checkpoint, or its folder with --load-dir"
            )
        super()._load_checkpoint()

    @check_main_thread
    def save_checkpoint(self, step: int) -> None:
        """As nerfstudio's, but atomic: the temporary file sits next to the checkpoint folder, since
        `--load-dir` reads every name inside it as a step number."""
        path = self.checkpoint_dir / f"step-{step:09d}.ckpt"
        state = {
            "step": step,
            "pipeline": self.pipeline.module.state_dict() if hasattr(self.pipeline, "module") else self.pipeline.state_dict(),  # type: ignore
            "optimizers": {k: v.state_dict() for (k, v) in self.optimizers.optimizers.items()},
            "schedulers": {k: v.state_dict() for (k, v) in self.optimizers.schedulers.items()},
            "scalers": self.grad_scaler.state_dict(),
        }
        with atomic_open(path, temporary_folder=self.checkpoint_dir.parent) as file:
            torch.save(state, file)
        if self.config.save_only_latest_checkpoint:
            for old in self.checkpoint_dir.glob("*.ckpt"):
                if old != path:
                    old.unlink()
