"""Viewer latency of a `difix3d-gs` run: per-frame time of `rgb` and `rgb_enhanced`; prints JSON.

Frames go through nerfstudio's own viewer render path (`RenderStateMachine._render_img` on a
settled, full-resolution frame, at the viewer's default "Max res" of 512, with its default depth
compositing), in a thread that is a `RenderStateMachine` as in `ns-viewer`, then the displayed
output is read and copied to the CPU as the viewer does before sending it. Three kinds of frame:

- `plain_rgb`: `rgb` of the run with the enhancer removed (what a run with Difix disabled costs);
- `difix_rgb`: `rgb` of the same run with Difix3D+ installed (should cost the same);
- `difix_rgb_enhanced`: `rgb_enhanced` shown (render + Difix).

    python scripts/bench_viewer_latency.py                         # trains a tiny CPU run with the embedded Difix
    python scripts/bench_viewer_latency.py --load-config outputs/.../config.yml --device cuda

Without `--load-config`, a procedural scene is built and `difix3d-gs` trained on it for `--steps`
steps on the CPU (with `difix3d.models.ids.EMBEDDED_DIFIX`) under `--work-dir`.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Optional, Tuple

import torch
import tyro

from difix3d.devices import device_name


@dataclass
class Args:
    load_config: Optional[Path] = None
    """config.yml of a difix3d-gs run; default: train a tiny one."""
    work_dir: Optional[Path] = None
    """Where the tiny run is built (default: a temporary folder, removed afterwards)."""
    steps: int = 300
    """Training steps of the tiny run."""
    device: Optional[str] = None
    """Render device (cpu, cuda); default: the run's."""
    difix: Optional[str] = None
    """Difix model to enhance with; default: the run's."""
    max_res: int = 512
    """The viewer's "Max res" (its default: 512)."""
    frames: int = 5
    """Timed frames of each kind (after one warm-up frame each); the median is reported."""


def train_tiny_run(work_dir: Path, steps: int) -> Path:
    from difix3d.data.scenes import build_scene
    from difix3d.models.ids import EMBEDDED_DIFIX

    scene = work_dir / "scene"
    if not scene.exists():
        build_scene(scene, seed=0, log=lambda message: None)
    output = work_dir / "outputs"
    command = [
        str(Path(sys.executable).parent / "ns-train"), "difix3d-gs", "--data", str(scene), "--output-dir", str(output),
        "--experiment-name", "bench", "--timestamp", "run", "--machine.device-type", "cpu", "--vis", "tensorboard",
        "--max-num-iterations", str(steps), "--steps-per-eval-image", "100000", "--steps-per-eval-all-images", "100000",
        "--pipeline.difix.model", EMBEDDED_DIFIX,
    ]
    print(f"training a tiny difix3d-gs run ({steps} steps) under {work_dir} ...", file=sys.stderr)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return output / "bench" / "difix3d-gs" / "run" / "config.yml"


def fake_viewer(model, max_res: int):
    """What `RenderStateMachine._render_img` reads of the viewer, at its defaults."""
    panel = SimpleNamespace(
        crop_viewport=False, max_res=max_res, background_color=(38, 42, 55), layer_depth=True,
        output_render="rgb", split=False, split_output_render="rgb",
    )
    return SimpleNamespace(
        control_panel=panel, get_model=lambda: model, train_lock=None, step=0, include_time=False,
        render_tab_state=SimpleNamespace(preview_render=False),
    )


def time_frames(model, camera_state, kinds: List[tuple], max_res: int, frames: int) -> Tuple[Dict[str, List[float]], Tuple[int, int]]:
    """Seconds per frame of each (name, enhancer, shown output), interleaved, in a viewer render thread."""
    from nerfstudio.viewer.render_state_machine import RenderStateMachine

    times: Dict[str, List[float]] = {name: [] for name, _, _ in kinds}
    renderer = RenderStateMachine(fake_viewer(model, max_res), viser_scale_ratio=1.0, client=None)
    renderer.state = "high"  # the settled frame
    failure: List[BaseException] = []
    frame_size = [0, 0]

    def run() -> None:
        try:
            for repeat in range(frames + 1):
                for name, enhancer, shown in kinds:
                    model.set_enhancer(enhancer)
                    renderer.viewer.control_panel.output_render = shown
                    start = time.perf_counter()
                    outputs = renderer._render_img(camera_state)
                    frame_size[:] = outputs[shown].cpu().shape[1::-1]
                    if repeat > 0:  # the first round warms up
                        times[name].append(time.perf_counter() - start)
        except BaseException as error:  # noqa: BLE001 - re-raised in the main thread
            failure.append(error)

    renderer.run = run
    renderer.start()
    renderer.join()
    if failure:
        raise failure[0]
    return times, (frame_size[0], frame_size[1])


def main(args: Args) -> None:
    from nerfstudio.cameras.cameras import CameraType
    from nerfstudio.utils.eval_utils import eval_setup
    from nerfstudio.viewer.utils import CameraState

    with tempfile.TemporaryDirectory() as temporary:
        config_path = args.load_config or train_tiny_run(args.work_dir or Path(temporary), args.steps)

        def update_config(config):
            if args.device is not None:
                config.machine.device_type = args.device
            if args.difix is not None:
                config.pipeline.difix.model = args.difix
            return config

        config, pipeline, _, _ = eval_setup(config_path, test_mode="test", update_config_callback=update_config)
        model = pipeline.model
        enhancer = pipeline.enhancer
        if enhancer is None:
            raise SystemExit("this run has Difix disabled: nothing to enhance")

        # A novel view: the first eval camera (else the first training camera), its field of view and aspect.
        dataset = pipeline.datamanager.eval_dataset if len(pipeline.datamanager.eval_dataset) else pipeline.datamanager.train_dataset
        camera = dataset.cameras[0]
        height, width = int(camera.height), int(camera.width)
        camera_state = CameraState(
            fov=2 * math.atan(height / 2 / float(camera.fy)), aspect=width / height,
            c2w=camera.camera_to_worlds.float().cpu(), camera_type=CameraType.PERSPECTIVE,
        )
        kinds = [("plain_rgb", None, "rgb"), ("difix_rgb", enhancer, "rgb"), ("difix_rgb_enhanced", enhancer, "rgb_enhanced")]
        times, frame_size = time_frames(model, camera_state, kinds, args.max_res, args.frames)
        median_ms = {name: round(1000 * statistics.median(values), 1) for name, values in times.items()}
        report = {
            "device": str(model.device),
            "cpu": device_name("cpu"),
            "torch_threads": torch.get_num_threads(),
            "difix": config.pipeline.difix.model,
            "gaussians": int(model.num_points),
            "frame_wh": list(frame_size),
            "frames": args.frames,
            "median_ms": median_ms,
            "all_ms": {name: [round(1000 * value, 1) for value in values] for name, values in times.items()},
            "rgb_ratio_difix_vs_plain": round(median_ms["difix_rgb"] / median_ms["plain_rgb"], 3),
        }
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(tyro.cli(Args))
