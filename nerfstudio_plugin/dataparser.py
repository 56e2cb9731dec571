"""COLMAP scenes for `difix3d-gs`: nerfstudio's COLMAP parser with a train/eval split that fits any scene,
and a one-line error for a damaged model.

The split (`eval_mode="auto"`): by file name where every image name contains `train` or `eval` (as
`difix3d scene` writes them: the eval frames are the targets of the progressive update), else
nerfstudio's usual split for COLMAP data (every 8th image held out); the log says which.
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Type

from nerfstudio.data.dataparsers.colmap_dataparser import ColmapDataParser, ColmapDataParserConfig
from nerfstudio.data.utils import colmap_parsing_utils as colmap_utils
from nerfstudio.utils.rich_utils import CONSOLE

from difix3d.errors import Difix3DError

# What nerfstudio's COLMAP readers raise on a truncated or corrupt binary file.
_DAMAGED_FILE_ERRORS = (struct.error, EOFError, UnicodeDecodeError)


@dataclass
class Difix3DColmapDataParserConfig(ColmapDataParserConfig):
    _target: Type = field(default_factory=lambda: Difix3DColmapDataParser)
    eval_mode: Literal["auto", "fraction", "filename", "interval", "all"] = "auto"
    """auto: by file name when every image name contains train or eval, else "interval" (nerfstudio's usual
    split for COLMAP data); or one of nerfstudio's modes."""


def names_carry_split(image_filenames) -> bool:
    """Whether every image name says train or eval, as nerfstudio's filename split needs."""
    names = [Path(name).name for name in image_filenames]
    return bool(names) and all("train" in name or "eval" in name for name in names)


class Difix3DColmapDataParser(ColmapDataParser):
    config: Difix3DColmapDataParserConfig

    def _get_image_indices(self, image_filenames, split):
        if self.config.eval_mode != "auto":
            return super()._get_image_indices(image_filenames, split)
        if names_carry_split(image_filenames):
            mode, why = "filename", "by file name (every image name contains train or eval)"
        else:
            mode = ColmapDataParserConfig.eval_mode
            why = f"nerfstudio's {mode} split, every {self.config.eval_interval}th image held out (the image names carry no train/eval)"
        if not getattr(self, "_split_logged", False):
            CONSOLE.log(f"Train/eval split: {why}; `colmap --eval-mode MODE` at the end of the ns-train line chooses another")
            self._split_logged = True
        auto_config = self.config
        self.config = dataclasses.replace(auto_config, eval_mode=mode)
        try:
            return super()._get_image_indices(image_filenames, split)
        finally:
            self.config = auto_config

    def _generate_dataparser_outputs(self, split: str = "train", **kwargs):
        try:
            return super()._generate_dataparser_outputs(split, **kwargs)
        except _DAMAGED_FILE_ERRORS as error:
            model = self.config.data / self.config.colmap_path
            raise Difix3DError(
                f"the COLMAP model {_damaged_file(model)} is truncated or corrupt ({type(error).__name__}: {error}); "
                "write the model again (COLMAP's mapper or model_converter)"
            ) from None


def _damaged_file(model: Path) -> Path:
    """The first binary file of the COLMAP model in `model` that nerfstudio cannot read (else the folder)."""
    readers = (
        ("cameras.bin", colmap_utils.read_cameras_binary),
        ("images.bin", colmap_utils.read_images_binary),
        ("points3D.bin", colmap_utils.read_points3D_binary),
    )
    for name, read in readers:
        if (model / name).is_file():
            try:
                read(model / name)
            except _DAMAGED_FILE_ERRORS:
                return model / name
    return model
