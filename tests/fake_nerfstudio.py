"""A stand-in for curation's nerfstudio subprocesses: "training" records the scene, "rendering"
writes noisy copies of its photographs where `ns-render` would. The strategies, pairing, manifests
and dataset assembly all run for real, in seconds.

As a script it runs `difix3d` with the stand-in: `python tests/fake_nerfstudio.py curate ...`.
With $FAKE_NERFSTUDIO_RENDEZVOUS=DIR:N, the first training call of each process waits until N
processes have reached it, so concurrent shards really overlap.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import imageio.v3 as iio
import numpy as np

from difix3d import curation

_RENDEZVOUS_TIMEOUT_S = 120


class FakeNerfstudio:
    def __init__(self, config: curation.CurateConfig, work: Path):
        self.work = work

    def train(self, scene_dir: Path, name: str, iterations: int, save_every: int | None = None) -> Path:
        _rendezvous()
        run = self.work / "runs" / name
        run.mkdir(parents=True)
        (run / "scene.txt").write_text(str(scene_dir))
        return run

    def render(self, run_dir: Path, split: str, split_names: Sequence[str], step: int | None = None) -> dict[str, Path]:
        scene_dir = Path((run_dir / "scene.txt").read_text())
        output = run_dir / "renders" / ("latest" if step is None else f"step{step:09d}")
        rng = np.random.default_rng(step or 0)
        files = {}
        for name in split_names:
            photo = iio.imread(scene_dir / "images" / name)[..., :3].astype(np.float64)
            render = np.clip(photo + rng.normal(0, 20, photo.shape), 0, 255).astype(np.uint8)
            files[name] = curation.rendered_file(output, split, split_names, name)
            files[name].parent.mkdir(parents=True, exist_ok=True)
            iio.imwrite(files[name], render)
        return files


_arrived = False


def _rendezvous() -> None:
    global _arrived
    setting = os.environ.get("FAKE_NERFSTUDIO_RENDEZVOUS")
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

    curation._Nerfstudio = FakeNerfstudio
    main(sys.argv[1:])
