"""A stand-in `difix3d.data.reconstruction.Reconstructor` for curation tests: "training" records what it
was asked, "rendering" writes noisy copies of the views' image files (seeded by the step). The
strategies, pairing, manifests and dataset assembly all run for real, in seconds.

As a script it runs `difix3d` with the stand-in: `python tests/fake_reconstructor.py curate ...`.
With $FAKE_RECONSTRUCTOR_RENDEZVOUS=DIR:N, the first training call of each process waits until N
processes have reached it, so concurrent shards really overlap.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import imageio.v3 as iio
import numpy as np

from difix3d.data import curation
from difix3d.data.reconstruction import TrainingViews

_RENDEZVOUS_TIMEOUT_S = 120


@dataclass
class FakeRun:
    views: TrainingViews
    folder: Path
    steps: int
    checkpoint_steps: tuple[int, ...]


class FakeReconstructor:
    def __init__(self):
        self.runs: list[FakeRun] = []  # every `train` call, in order
        self.rendered: list[tuple[FakeRun, list[str], int | None]] = []  # every `render` call

    def train(self, views: TrainingViews, folder: Path, steps: int, checkpoint_steps: Sequence[int] = ()) -> FakeRun:
        _rendezvous()
        folder.mkdir(parents=True)  # a new folder, as the protocol promises
        run = FakeRun(views, folder, steps, tuple(checkpoint_steps))
        self.runs.append(run)
        return run

    def render(self, run: FakeRun, names: Sequence[str], step: int | None = None) -> dict[str, Path]:
        assert set(names) <= set(run.views.render), "rendering a view the reconstruction was not trained to render"
        assert step is None or step in run.checkpoint_steps, f"no checkpoint at step {step}"
        self.rendered.append((run, list(names), step))
        rng = np.random.default_rng(step or 0)
        files = {}
        for name in names:
            source = run.views.extra_views[name][0] if name in run.views.extra_views else run.views.scene.image_path(name)
            photo = iio.imread(source)[..., :3].astype(np.float64)
            files[name] = (run.folder / "renders" / str(step) / name).with_suffix(".png")
            files[name].parent.mkdir(parents=True, exist_ok=True)
            iio.imwrite(files[name], np.clip(photo + rng.normal(0, 20, photo.shape), 0, 255).astype(np.uint8))
        return files


_arrived = False


def _rendezvous() -> None:
    global _arrived
    setting = os.environ.get("FAKE_RECONSTRUCTOR_RENDEZVOUS")
    if not setting or _arrived:
        return
    _arrived = True
    folder, parties = setting.rsplit(":", 1)
    Path(folder, str(os.getpid())).touch()
    deadline = time.monotonic() + _RENDEZVOUS_TIMEOUT_S
    while len(list(Path(folder).iterdir())) < int(parties):
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(list(Path(folder).iterdir()))} of {parties} processes arrived")
        time.sleep(0.05)


if __name__ == "__main__":
    from difix3d.cli import main

    curation.make_reconstructor = lambda config: FakeReconstructor()
    main(sys.argv[1:])
