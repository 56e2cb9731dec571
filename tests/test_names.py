"""One name for each shared constant and for each flag across commands."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Annotated

import tyro

import difix3d
from difix3d.models.ids import DEFAULT_BASE, PROMPT


def test_prompt_is_defined_once():
    library = Path(difix3d.__file__).parent
    definitions = [path.relative_to(library).as_posix() for path in library.rglob("*.py") if re.search(r"^PROMPT\s*=", path.read_text(), re.M)]
    assert definitions == ["models/ids.py"]
    from difix3d.data import curation
    from difix3d.models import difix as model

    assert curation.PROMPT is model.PROMPT is PROMPT


def test_base_flag_is_base_in_fix_train_and_the_plugin():
    from difix3d.fix import fix_command
    from difix3d.training.finetune import TrainConfig
    from nerfstudio_plugin.pipeline import DifixSettings

    assert inspect.signature(fix_command).parameters["base"].default == DEFAULT_BASE
    assert DifixSettings().base == DEFAULT_BASE
    parse = tyro.conf.OmitArgPrefixes

    def train_base(*flags: str) -> str:
        return tyro.cli(Annotated[TrainConfig, parse], args=["--dataset", "d.json", "--output", "out", *flags]).base

    assert train_base() == DEFAULT_BASE
    assert train_base("--base", "my/turbo") == "my/turbo"
    assert train_base("--base-model", "old/turbo") == "old/turbo"  # the old name still works
