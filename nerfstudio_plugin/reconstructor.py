"""Curation's reconstructor through nerfstudio: `difix3d-gs` with Difix off (plain Splatfacto).

Each reconstruction is a derived COLMAP scene (`difix3d.data.reconstruction.write_colmap_scene`) with
nerfstudio's split lists (`train_list.txt`, `val_list.txt`, `test_list.txt`: the views it trains on and
the ones it renders), trained by `ns-train` and rendered by `ns-render dataset --split test` (both
through `nerfstudio_plugin.runner`, output in log files). `train` only prepares the run: its first
latest-checkpoint render trains and renders in one child process, which saves a nerfstudio start
(about 13 s of CPU); a render of an earlier checkpoint trains first.

Steps are nerfstudio's: the checkpoint of step s is saved after its step s, counted from 0.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from difix3d.data.reconstruction import TrainingViews, write_colmap_scene
from difix3d.errors import Difix3DError
from nerfstudio_plugin import runner


@dataclass
class NerfstudioRun:
    """A trained `difix3d-gs` run of a `NerfstudioReconstructor`."""

    views: TrainingViews
    folder: Path  # the reconstruction's working folder: scene/, runs/, logs/
    run_dir: Path  # nerfstudio's run folder: config.yml, nerfstudio_models/
    pending_train: list[str] | None = None  # the ns-train command line, until it has run


class NerfstudioReconstructor:
    def __init__(self, device: str = "cpu"):
        self.device = device
        for tool in ("ns-train", "ns-render"):
            if not (runner.BIN / tool).exists():
                raise Difix3DError(f"{tool} not found in {runner.BIN}; install nerfstudio in this environment")

    def train(self, views: TrainingViews, folder: Path, steps: int, checkpoint_steps: Sequence[int] = ()) -> NerfstudioRun:
        """Train for `steps` steps (or up to the last checkpoint step, if later); with `checkpoint_steps`,
        every checkpoint at a multiple of their greatest common divisor is kept."""
        import math

        data = write_nerfstudio_scene(views, folder / "scene")
        saving = {"save_every": math.gcd(*checkpoint_steps), "keep_checkpoints": True} if checkpoint_steps else {}
        command = runner.train_command(
            data, folder / "runs", "reconstruction", max([steps, *(step + 1 for step in checkpoint_steps)]),
            "--pipeline.difix.enabled", "False",
            device=self.device, eval_loss=False, **saving,
            dataparser=["colmap", "--colmap-path", "sparse/0", "--downscale-factor", views.downscale_factor],
        )  # fmt: skip
        return NerfstudioRun(views, folder, runner.run_dir(folder / "runs", "reconstruction"), pending_train=command)

    def finish_training(self, reconstruction: NerfstudioRun) -> None:
        """Run the reconstruction's ns-train now, if it has not run yet."""
        if reconstruction.pending_train is not None:
            runner.run(reconstruction.pending_train, log_file=reconstruction.folder / "logs" / "ns-train.log")
            reconstruction.pending_train = None

    def render(self, reconstruction: NerfstudioRun, names: Sequence[str], step: int | None = None) -> dict[str, Path]:
        """Render the run's test split (its `render` views) from the latest checkpoint or `step`'s."""
        unknown = [name for name in names if name not in reconstruction.views.render]
        if unknown:
            raise Difix3DError(f"cannot render {unknown[0]}: not in the views this reconstruction was trained to render")
        config = reconstruction.run_dir / "config.yml"
        label = "latest" if step is None else f"step{step:09d}"
        if step is not None:
            self.finish_training(reconstruction)  # the checkpoint's config is written from the trained run's
            config = checkpoint_config(config, step)
        output = reconstruction.run_dir / "renders" / label
        render = runner.render_command(config, "test", ["rgb"], output)
        logs = reconstruction.folder / "logs"
        if reconstruction.pending_train is not None:
            runner.run_in_one_process([reconstruction.pending_train, render], log_file=logs / f"ns-train-and-render-{label}.log")
            reconstruction.pending_train = None
        else:
            runner.run(render, log_file=logs / f"ns-render-{label}.log")
        split_names = reconstruction.views.render
        files = {name: rendered_file(output, "test", split_names, name) for name in names}
        missing = [str(path) for path in files.values() if not path.is_file()]
        if missing:
            raise Difix3DError(f"ns-render wrote no {missing[0]} ({len(missing)} render(s) missing)")
        return files


def write_nerfstudio_scene(views: TrainingViews, destination: Path) -> Path:
    """`views` as a COLMAP scene folder that nerfstudio's COLMAP dataparser splits into `views.train`
    ("train") and `views.render` ("val", evaluated while training, and "test")."""
    write_colmap_scene(views, destination)
    for split, names in (("train", views.train), ("val", views.render), ("test", views.render)):
        (destination / f"{split}_list.txt").write_text("".join(f"{name}\n" for name in names))
    return destination


def checkpoint_config(config: Path, step: int) -> Path:
    """A copy of a run's config.yml that loads the checkpoint of `step` (ns-render has no flag for it)."""
    import yaml

    import nerfstudio_plugin.config  # noqa: F401  (the classes config.yml names)

    if not (config.parent / "nerfstudio_models" / f"step-{step:09d}.ckpt").is_file():
        raise Difix3DError(f"{config.parent} has no checkpoint of step {step}")
    trainer_config = yaml.load(config.read_text(), Loader=yaml.Loader)
    trainer_config.load_step = step
    copy = config.with_name(f"config_step{step:09d}.yml")
    copy.write_text(yaml.dump(trainer_config), "utf8")
    return copy


def rendered_file(render_dir: Path, split: str, split_names: Sequence[str], name: str) -> Path:
    """Where `ns-render dataset --rendered-output-names rgb --image-format png` writes view `name`:
    its path relative to the common folder of the split's images, with a .png suffix."""
    root = os.path.commonpath([f"images/{view}" for view in split_names])
    relative = os.path.relpath(f"images/{name}", root)
    return (render_dir / split / "rgb" / relative).with_suffix(".png")
