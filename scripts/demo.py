"""`make demo`: the main job, end to end, on a tiny procedural scene, on the CPU.

1. `difix3d scene` builds a procedural room with real COLMAP SfM (training views on one side,
   extreme held-out views on the other);
2. `ns-train difix3d-gs` reconstructs it twice: plain 3DGS (Difix off) and Difix3D (pseudo views);
3. `ns-render dataset` renders the held-out views: `rgb`, and `rgb_enhanced` (Difix3D+);
4. `ns-eval` scores them against the held-out images, and the demo prints the comparison.

The Difix used is the embedded default (see `DEFAULT_DIFIX`); the log says which one it is.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import tyro

from difix3d.data.scenes import GROUND_TRUTH_FILE
from difix3d.errors import Difix3DError
from difix3d.images import column_labels
from difix3d.imagenet_weights import missing_weights_message
from difix3d.models.ids import EMBEDDED_DIFIX
from nerfstudio_plugin import runner as nerfstudio_runner
from nerfstudio_plugin.runner import BIN

DEFAULT_DIFIX = EMBEDDED_DIFIX


@dataclass
class Demo:
    output: Path = Path("demo_output")
    """Where the scene, the run, the renders and the metrics go."""
    model: str = DEFAULT_DIFIX
    """Difix to use (hub id, folder, release .pkl, or random-tiny-architecture)."""
    # The settings of benchmarks/quality.md, so the demo is one scene of that benchmark's protocol.
    steps: int = 1000
    """Training steps."""
    fix_start: int = 400
    """First fix round."""
    steps_per_fix: int = 150
    """Steps between fix rounds."""
    pose_step: float = 0.3
    """How far each fix round moves the pseudo poses (nerfstudio scales scenes into [-1, 1])."""
    seed: int = 1000
    """Scene seed. The default is the benchmark's typical evaluation scene: the one whose Difix3D+
    gain over plain 3DGS is nearest the benchmark's mean (not its best)."""
    train_seed: int = 0
    """nerfstudio's training seed: the benchmark's first, so the demo's runs are that scene's runs there."""
    benchmark: Path = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.json"
    """The benchmark whose means are printed next to the demo's own numbers."""


def run(command: list) -> None:
    """Run a command, its output on this terminal, after printing it."""
    nerfstudio_runner.run([str(part) for part in command], echo=True)


def train_render_eval(demo: Demo, scene: Path, name: str, *method_args) -> dict:
    """ns-train difix3d-gs, then ns-render the held-out views and ns-eval them; returns the metrics."""
    runs = demo.output / "runs"
    run(nerfstudio_runner.train_command(scene, runs, name, demo.steps, *method_args, device="cpu", seed=demo.train_seed, save_every=demo.steps))
    config = nerfstudio_runner.run_dir(runs, name) / "config.yml"
    outputs = ["rgb", "rgb_enhanced"] if name == "difix3d" else ["rgb"]
    run(nerfstudio_runner.render_command(config, "test", outputs, demo.output / "renders" / name, image_format=None))
    metrics_path = demo.output / f"metrics_{name}.json"
    run([BIN / "ns-eval", "--load-config", config, "--output-path", metrics_path])
    return json.loads(metrics_path.read_text())["results"]


def comparison_grid(demo: Demo, scene: Path) -> Path:
    """GT | 3DGS | Difix3D | Difix3D+ for every held-out view, one row each."""
    renders = demo.output / "renders"
    rows = []
    for truth in sorted((scene / "images").glob("frame_eval_*.png")):
        name = truth.stem + ".jpg"
        columns = [
            truth,
            renders / "plain" / "test" / "rgb" / name,
            renders / "difix3d" / "test" / "rgb" / name,
            renders / "difix3d" / "test" / "rgb_enhanced" / name,
        ]
        rows.append(np.concatenate([iio.imread(path)[..., :3] for path in columns], axis=1))
    grid = np.concatenate(rows, axis=0)
    path = demo.output / "comparison.png"
    iio.imwrite(path, np.concatenate([column_labels(grid.shape[1], COMPARISON_COLUMNS), grid], axis=0))
    return path


COMPARISON_COLUMNS = ("GT", "3DGS", "Difix3D", "Difix3D+")


def print_row(label: str, psnr: float, ssim: float, lpips: float | None) -> None:
    """One line of the demo's tables (LPIPS "n/a" where it could not be measured)."""
    lpips_text = f"{lpips:7.4f}" if lpips is not None else "    n/a"
    print(f"{label:10s} {psnr:7.2f} {ssim:7.4f} {lpips_text}")


def print_benchmark_means(demo: Demo, rows) -> None:
    """The benchmark's means for the same methods (one scene is one sample; they are the claim)."""
    if not demo.benchmark.is_file():
        return
    report = json.loads(demo.benchmark.read_text())
    if report["difix"]["spec"] != "embedded" or demo.model != EMBEDDED_DIFIX:
        print(f"(benchmarks: {demo.benchmark.name} scores another Difix, {report['difix']['spec']})")
        return
    methods = report["summary"]["methods"]
    print(f"\nThe benchmark's means over {len(report['scenes'])} held-out scenes, same Difix and settings "
          f"(benchmarks/quality.md, commit {report['code']['current']['commit'][:12]}):")
    for label, method in zip([row[0] for row in rows], ("3dgs", "difix3d", "difix3d+")):
        scores = methods[method]
        print_row(label, scores["psnr"]["mean"], scores["ssim"]["mean"], (scores.get("lpips") or {}).get("mean"))
    same_scene = [scene for scene in report["scenes"] if scene["scene"] == f"eval_{demo.seed}"]
    if same_scene and demo.train_seed == report["summary"]["noise_floor"]["seeds"][0]:
        # The same runs, scored from the benchmark's saved PNGs: on its machine, the demo's up to 8-bit rounding.
        print(f"\nThis scene in the benchmark ({same_scene[0]['scene']}, the same runs; "
              "another machine's floating point can move CPU runs by a few tenths of a dB):")
        for label, method in zip([row[0] for row in rows], ("3dgs", "difix3d", "difix3d+")):
            scores = same_scene[0]["mean"][method]
            print_row(label, scores["psnr"], scores["ssim"], scores.get("lpips"))


def scene_seed(scene: Path) -> int | None:
    """The seed of the procedural scene in `scene`, or None when there is no finished scene there."""
    if not (scene / "sparse" / "0").is_dir() or not (scene / GROUND_TRUTH_FILE).is_file():
        return None
    return int(json.loads((scene / GROUND_TRUTH_FILE).read_text())["seed"])


def main(demo: Demo) -> None:
    started = time.time()
    scene = demo.output / "scene"
    if scene_seed(scene) != demo.seed:  # a scene left by a run with another seed is not this demo's
        run([BIN / "difix3d", "scene", "--out", scene, "--seed", demo.seed, "--overwrite"])
    shutil.rmtree(demo.output / "runs", ignore_errors=True)
    notes = {
        "random-tiny-architecture": " (random weights: plumbing only, no quality gain)",
        EMBEDDED_DIFIX: " (embedded: the `small` Difix trained on procedural scenes, see its README.md)",
    }
    print(f"Difix model: {demo.model}" + notes.get(demo.model, ""))
    plain = train_render_eval(demo, scene, "plain", "--pipeline.difix.enabled", "False")
    fixed = train_render_eval(
        demo, scene, "difix3d", "--pipeline.difix.model", demo.model,
        "--pipeline.progressive.fix-start", demo.fix_start, "--pipeline.progressive.steps-per-fix", demo.steps_per_fix,
        "--pipeline.progressive.pose-step", demo.pose_step,
    )
    manifest = json.loads((nerfstudio_runner.run_dir(demo.output / "runs", "difix3d") / "difix3d" / "manifest.json").read_text())

    print("\n== difix3d demo: held-out extreme views of a procedural scene ==")
    print(f"scene:       {scene} (held-out views: {scene / 'images'}/frame_eval_*.png)")
    print(f"Difix:       {demo.model}")
    print(f"fix rounds:  {len(manifest['rounds'])}, pseudo views: {sum(len(r['views']) for r in manifest['rounds'])}")
    print(f"renders:     {demo.output / 'renders'}/{{plain,difix3d}}/test/")
    print(f"comparison:  {comparison_grid(demo, scene)} ({' | '.join(COMPARISON_COLUMNS)}, one row per held-out view)")
    rows = [("3DGS", plain, ""), ("Difix3D", fixed, ""), ("Difix3D+", fixed, "_enhanced")]
    print(f"{'method':10s} {'PSNR':>7s} {'SSIM':>7s} {'LPIPS':>7s}   (LPIPS: AlexNet, lower is better)")
    for label, results, suffix in rows:
        print_row(label, results[f"psnr{suffix}"], results[f"ssim{suffix}"], results.get(f"lpips{suffix}"))
    if any(f"lpips{suffix}" not in results for _, results, suffix in rows):
        print(f"(LPIPS n/a: {missing_weights_message('alex')})")
    print_benchmark_means(demo, rows)
    print(f"took {time.time() - started:.0f} s")
    config = nerfstudio_runner.run_dir(demo.output / "runs", "difix3d") / "config.yml"
    print(f"\nThe Difix3D run: {config}. Next:")
    print(f"  ns-render dataset --load-config {config} --split test --rendered-output-names rgb rgb_enhanced --output-path renders")
    print(f"  ns-viewer --load-config {config}   # look around in the browser")
    print(f"  ns-train difix3d-gs --data {scene} --machine.device-type cpu --pipeline.difix.model {demo.model}"
          "   # your scene and Difix (nvidia/difix_ref on a GPU)")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        main(tyro.cli(Demo))
    except Difix3DError as error:
        print(f"demo: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
