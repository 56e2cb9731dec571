"""The trainer of `ns-train difix3d-gs` / `difix3d-nerfacto`: nerfstudio's, plus the training
process's CPU settings (an entry point's choice; ns-render, ns-eval and the viewer keep their own)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Type

from nerfstudio.engine.trainer import Trainer, TrainerConfig

from difix3d.runtime import configure_cpu_runtime


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
