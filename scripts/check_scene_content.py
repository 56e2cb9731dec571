"""Does a procedural scene content still work? SfM registers every view; 3DGS fits the training views.

    python scripts/check_scene_content.py --work WORK --out benchmarks/scene_content \\
        --contents shapes materials --seeds 1000 1001 1002 1003 1004 1005 3000 3001 3002 3003

For each content and seed: builds the scene as the benchmark does (`difix3d.data.scenes.build_scene`,
160x120, 12 training and 8 extreme held-out views, pycolmap SfM over all 20), counts the registered
views and 3D points, fits 3DGS to the training views the way the ground-truth data engine does
(`difix3d.rendering.gaussians.fit_splats`, 1,000 steps, seed points lifted from the true depth) and
scores its renders of the training views and of the held-out views (PSNR / SSIM). Each scene's
result is kept in WORK (a rerun skips it); the report (markdown, JSON and a contact sheet: a
training and a held-out view of each scene beside their 3DGS renders) goes to OUT.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch
import tyro
from tqdm import tqdm


@dataclass
class CheckSceneContent:
    work: Path
    """Folder for the scenes and each scene's result (reused by a rerun)."""
    out: Path
    """Folder for the report: scene_content.md, scene_content.json, scene_content.png."""
    contents: list[str] = field(default_factory=lambda: ["shapes", "materials"])
    seeds: list[int] = field(default_factory=lambda: [1000, 1001, 1002, 1003, 1004, 1005])
    steps: int = 1000
    """3DGS steps (the benchmark's and the data engine's schedule)."""
    seed_points: int = 3000
    threads: int = 0
    """torch CPU threads (0: torch's default)."""


def check_scene(settings: CheckSceneContent, content: str, seed: int) -> dict:
    """Builds, reconstructs and scores one scene; returns (and keeps) its result."""
    from difix3d.data.scenes import build_scene, load_ground_truth
    from difix3d.errors import Difix3DError
    from difix3d.images import from_uint8, to_uint8
    from difix3d.metrics import psnr, ssim
    from difix3d.rendering.gaussians import EVAL_BACKGROUND, SplatFitConfig, fit_splats, render_splats, seed_points_from_depth

    folder = settings.work / f"{content}_{seed}"
    result_file = folder / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    import pycolmap

    started = time.process_time()
    scene = folder / "scene"
    result: dict = {"content": content, "seed": seed}
    try:
        build_scene(scene, seed=seed, overwrite=True, log=lambda message: None, content=content)
        reconstruction = pycolmap.Reconstruction(str(scene / "sparse" / "0"))
        result["registered"], result["points3d"] = reconstruction.num_reg_images(), reconstruction.num_points3D()
    except Difix3DError as error:  # SfM left views out: build the scene without it to still score 3DGS
        result["registered"], result["points3d"], result["sfm_error"] = None, None, str(error)
        build_scene(scene, seed=seed, overwrite=True, log=lambda message: None, content=content, sfm=False)
    truth = load_ground_truth(scene)
    result["views"] = len(truth.frames)
    split = {name: [f for f in truth.frames if f.split == name] for name in ("train", "eval")}
    images = {name: from_uint8(np.stack([iio.imread(scene / f.file_path)[..., :3] for f in frames])) for name, frames in split.items()}
    poses = {name: np.stack([f.camera_to_world for f in frames]) for name, frames in split.items()}
    K = truth.intrinsics.matrix()
    rng = np.random.default_rng([seed, 8])
    depths = np.stack([truth.render(pose, supersample=1).depth for pose in poses["train"]])
    points, colours = seed_points_from_depth(images["train"], depths, poses["train"], np.broadcast_to(K, (len(depths), 3, 3)),
                                             settings.seed_points, rng)  # fmt: skip
    params = fit_splats(
        torch.from_numpy(images["train"]), torch.from_numpy(poses["train"]).float(),
        torch.from_numpy(np.broadcast_to(K, (len(depths), 3, 3)).copy()).float(),
        torch.from_numpy(points).float(), torch.from_numpy(colours).float(), SplatFitConfig(steps=settings.steps, seed=seed),
    )  # fmt: skip
    with torch.no_grad():
        for name in ("train", "eval"):
            count = len(poses[name])
            rgb, _, _ = render_splats(params, torch.from_numpy(poses[name]).float(),
                                      torch.from_numpy(np.broadcast_to(K, (count, 3, 3)).copy()).float(),
                                      truth.intrinsics.width, truth.intrinsics.height, sh_degree=3,
                                      background=torch.tensor([EVAL_BACKGROUND]).expand(count, 3))  # fmt: skip
            rendered = rgb.clamp(0, 1).permute(0, 3, 1, 2)
            target = torch.from_numpy(images[name]).permute(0, 3, 1, 2)
            result[f"{name}_psnr"] = float(psnr(rendered, target).mean())
            result[f"{name}_ssim"] = float(ssim(rendered, target).mean())
            iio.imwrite(folder / f"{name}_render.png", to_uint8(rendered[0].permute(1, 2, 0).numpy()))
            iio.imwrite(folder / f"{name}_truth.png", to_uint8(images[name][0]))
    result["cpu_seconds"] = round(time.process_time() - started, 1)
    result_file.write_text(json.dumps(result, indent=1))
    return result


def _mean(results: list[dict], key: str) -> float:
    return float(np.mean([r[key] for r in results]))


def report(settings: CheckSceneContent, results: list[dict]) -> str:
    lines = [
        "# Scene content check",
        "",
        "`python scripts/" + Path(__file__).name + " --work WORK --out OUT --contents " + " ".join(settings.contents)
        + " --seeds " + " ".join(map(str, settings.seeds)) + "`",
        "",
        f"Per scene: 160x120, 12 training + 8 extreme held-out views; SfM (pycolmap) over all 20; 3DGS fitted to the "
        f"training views for {settings.steps} steps (the data engine's fit); PSNR / SSIM of its renders. "
        "`scene_content.png`: a row per scene in this table's order, a training view and a held-out view beside their 3DGS renders.",
        "",
        "| content | seed | SfM registered | 3D points | 3DGS on training views | 3DGS on held-out views | CPU s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        registered = f"{r['registered']} / {r['views']}" if r["registered"] is not None else f"failed ({r['sfm_error'][:60]})"
        lines.append(
            f"| {r['content']} | {r['seed']} | {registered} | {r['points3d'] or '-'} | {r['train_psnr']:.2f} / {r['train_ssim']:.3f} "
            f"| {r['eval_psnr']:.2f} / {r['eval_ssim']:.3f} | {r['cpu_seconds']:.0f} |"
        )
    lines += ["", "| content | scenes | all views registered | min training-view PSNR | mean training-view PSNR | mean held-out PSNR |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for content in settings.contents:
        mine = [r for r in results if r["content"] == content]
        if mine:
            complete = sum(r["registered"] == r["views"] for r in mine)
            lines.append(
                f"| {content} | {len(mine)} | {complete} of {len(mine)} | {min(r['train_psnr'] for r in mine):.2f} "
                f"| {_mean(mine, 'train_psnr'):.2f} | {_mean(mine, 'eval_psnr'):.2f} |"
            )
    return "\n".join(lines) + "\n"


SHEET_COLUMNS = ("training view", "3DGS render", "held-out view", "3DGS render")


def contact_sheet(settings: CheckSceneContent, results: list[dict]) -> np.ndarray:
    """One row per scene (in the report's order): a training view, its 3DGS render, a held-out
    view, its 3DGS render; the columns labelled on top."""
    from difix3d.images import column_labels

    rows = []
    for r in results:
        folder = settings.work / f"{r['content']}_{r['seed']}"
        tiles = [iio.imread(folder / f"{name}_{kind}.png") for name in ("train", "eval") for kind in ("truth", "render")]
        rows.append(np.concatenate(tiles, axis=1))
    grid = np.concatenate(rows, axis=0)
    return np.concatenate([column_labels(grid.shape[1], SHEET_COLUMNS), grid], axis=0)


def main(settings: CheckSceneContent) -> list[dict]:
    if settings.threads:
        torch.set_num_threads(settings.threads)
    jobs = [(content, seed) for content in settings.contents for seed in settings.seeds]
    results = [check_scene(settings, content, seed) for content, seed in tqdm(jobs, desc="scenes", unit="scene")]
    settings.out.mkdir(parents=True, exist_ok=True)
    (settings.out / "scene_content.md").write_text(report(settings, results))
    (settings.out / "scene_content.json").write_text(json.dumps(results, indent=1))
    iio.imwrite(settings.out / "scene_content.png", contact_sheet(settings, results))
    print(report(settings, results))
    return results


if __name__ == "__main__":
    main(tyro.cli(CheckSceneContent))
