"""The ground-truth data engine: Difix training pairs from procedural scenes, at any pose.

A procedural scene (`difix3d.data.scenes`) can be ray-traced at any camera pose, so its pairs are not
limited to held-out photographs. For each scene this reconstructs 3DGS the way the quality
benchmark does (its sparse training views on one side of the room; `difix3d.rendering.gaussians`, seeded from
surface points the training views see), then renders the reconstruction at many novel poses and at
several points of its schedule (under-trained snapshots give milder and stronger artifacts), and
pairs every render with the ray-traced truth and the nearest training image as reference.

Novel poses (true world frame, seeded by the scene):
- extreme targets like the benchmark's held-out views: beyond either end of the training arc,
  farther out and higher up, looking at the objects with a jittered aim;
- progressive poses on the way from each target's nearest training camera toward it (what the fix
  rounds of Difix3D render);
- wide poses: anywhere around the room's centre at varied distance and height;
- the training poses themselves: renders there are nearly clean (only the under-trained snapshots
  blur them), so these pairs teach Difix to leave good pixels alone, which Difix3D+ relies on when
  it enhances every render. They are referenced by the nearest *other* training view, as Difix3D+'s
  own enhancement of a training-view render would be.

Output: `OUT/<scene>/ground-truth/{truth,step-XXXXX}/<pose>.png`, the references under
`OUT/<scene>/images/`, and the manifest `OUT/<scene>/ground-truth.json` (written last: a finished
scene is skipped on the next run), in `difix3d.data.curation`'s manifest format.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch

from difix3d.core.poses import nearest_poses, quaternion_slerp, matrix_to_quaternion, quaternion_to_matrix
from difix3d.data.scenes import GroundTruth, load_ground_truth, look_at
from difix3d.errors import Difix3DError
from difix3d.images import from_uint8, to_uint8
from difix3d.models.ids import PROMPT
from difix3d.rendering.gaussians import EVAL_BACKGROUND, SplatFitConfig, fit_splats, render_splats, seed_points_from_depth

STRATEGY = "ground-truth"
TRAINING_VIEW_PREFIX = "training_"


@dataclass(frozen=True)
class GroundTruthPairsConfig:
    """Settings of the ground-truth strategy (recorded in each scene's manifest)."""

    steps: int = 1000
    """3DGS steps of the reconstruction (the benchmark's schedule)."""
    snapshot_steps: tuple[int, ...] = (400, 700, 1000)
    """Render the reconstruction after these steps: the benchmark's fix rounds render from step 400 on."""
    num_extreme: int = 12
    """Extreme target poses per scene."""
    progress_fractions: tuple[float, ...] = (0.4, 0.7)
    """Poses on the way from a target's nearest training camera to it (fractions of the way)."""
    num_wide: int = 10
    """Poses anywhere around the scene's centre."""
    training_views: bool = True
    """Also pair renders at the training poses with their training images (near-identity pairs)."""
    seed_points: int = 3000
    """Seed points of the reconstruction (SfM's sparse points stand-in)."""
    supersample: int = 4
    """Rays per pixel side of the ray-traced truth (the training images use the equivalent of 4)."""


def novel_poses(ground_truth: GroundTruth, config: GroundTruthPairsConfig) -> dict[str, np.ndarray]:
    """Named OpenCV camera-to-world poses in the scene's world frame (see the module docstring)."""
    rng = np.random.default_rng([ground_truth.seed, 7])
    train = np.stack([frame.camera_to_world for frame in ground_truth.frames if frame.split == "train"])
    poses: dict[str, np.ndarray] = {}

    def aimed(azimuth_deg: float, radius: float, height: float) -> np.ndarray:
        azimuth = np.radians(azimuth_deg)
        eye = np.array([radius * np.cos(azimuth), radius * np.sin(azimuth), height])
        aim = np.array([*rng.uniform(-0.5, 0.5, 2), rng.uniform(0.1, 0.7)])
        return look_at(eye, aim)

    for index in range(config.num_extreme):
        side = 1 if index % 2 == 0 else -1
        target = aimed(side * rng.uniform(55, 95), rng.uniform(3.0, 3.7), rng.uniform(1.7, 2.6))
        poses[f"extreme_{index:03d}"] = target
        nearest = train[int(nearest_poses(torch.from_numpy(target[None, :3]), torch.from_numpy(train[:, :3]))[0][0, 0])]
        for fraction in config.progress_fractions:
            poses[f"extreme_{index:03d}_at_{round(100 * fraction):02d}"] = _interpolate(nearest, target, fraction)
    for index in range(config.num_wide):
        poses[f"wide_{index:03d}"] = aimed(rng.uniform(-110, 110), rng.uniform(2.2, 3.7), rng.uniform(0.7, 2.6))
    if config.training_views:
        for index, pose in enumerate(train):
            poses[f"{TRAINING_VIEW_PREFIX}{index:03d}"] = pose
    return poses


def curate_ground_truth_scene(scene_dir: Path, out: Path, config: GroundTruthPairsConfig, progress: bool = True) -> list[dict]:
    """Reconstruct one procedural scene, render and ray-trace its novel poses, write the images under
    OUT/<scene>/ and return the pairs (paths relative to OUT)."""
    scene_dir, out = Path(scene_dir), Path(out)
    ground_truth = load_ground_truth(scene_dir)
    scene_id = scene_dir.resolve().name
    intrinsics = ground_truth.intrinsics
    train_frames = [frame for frame in ground_truth.frames if frame.split == "train"]
    if not train_frames:
        raise Difix3DError(f"scene {scene_dir} has no training views")
    images = from_uint8(np.stack([iio.imread(scene_dir / frame.file_path)[..., :3] for frame in train_frames]))
    train_poses = np.stack([frame.camera_to_world for frame in train_frames])
    K = np.broadcast_to(intrinsics.matrix(), (len(train_frames), 3, 3))

    rng = np.random.default_rng([ground_truth.seed, 8])
    depths = np.stack([ground_truth.render(pose, supersample=1).depth for pose in train_poses])
    points, colours = seed_points_from_depth(images, depths, train_poses, K, config.seed_points, rng)

    poses = novel_poses(ground_truth, config)
    names = list(poses)
    strategy_dir = out / scene_id / STRATEGY
    truth_dir = strategy_dir / "truth"
    truth_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        if (truth_dir / f"{name}.png").is_file():
            continue
        if name.startswith(TRAINING_VIEW_PREFIX):  # the image the reconstruction was fitted to
            _write_png(truth_dir / f"{name}.png", images[int(name.removeprefix(TRAINING_VIEW_PREFIX))])
        else:
            _write_png(truth_dir / f"{name}.png", ground_truth.render(poses[name], supersample=config.supersample).rgb)

    novel = torch.from_numpy(np.stack([poses[name] for name in names])).float()
    novel_K = torch.from_numpy(np.broadcast_to(intrinsics.matrix(), (len(names), 3, 3)).copy()).float()
    background = torch.tensor([EVAL_BACKGROUND])

    def render_snapshot(step: int, params) -> None:
        folder = strategy_dir / f"step-{step:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        for start in range(0, len(names), 8):
            rgb, _, _ = render_splats(params, novel[start : start + 8], novel_K[start : start + 8],
                                      intrinsics.width, intrinsics.height, sh_degree=3,
                                      background=background.expand(len(novel[start : start + 8]), 3))  # fmt: skip
            rgb = rgb.clamp(0, 1)
            for offset, image in enumerate(rgb.numpy()):
                _write_png(folder / f"{names[start + offset]}.png", image)

    splat_config = SplatFitConfig(steps=config.steps, seed=ground_truth.seed)
    fit_splats(
        torch.from_numpy(images), torch.from_numpy(train_poses).float(), torch.from_numpy(K.copy()).float(),
        torch.from_numpy(points).float(), torch.from_numpy(colours).float(), splat_config,
        on_step=render_snapshot, snapshot_steps=config.snapshot_steps, progress=progress,
    )  # fmt: skip

    # A training pose's nearest training view is itself; its pairs take the next one.
    nearest_two = nearest_poses(novel[:, :3].double(), torch.from_numpy(train_poses[:, :3]), k=min(2, len(train_frames)))[0]
    references = [int(row[-1] if name.startswith(TRAINING_VIEW_PREFIX) else row[0]) for name, row in zip(names, nearest_two)]
    images_dir = out / scene_id / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    pairs = []
    for step in config.snapshot_steps:
        for name, reference in zip(names, references):
            ref_frame = train_frames[reference]
            ref_file = images_dir / ref_frame.name
            if not ref_file.is_file():
                shutil.copyfile(scene_dir / ref_frame.file_path, ref_file)
            pairs.append(
                {
                    "id": f"{scene_id}/{STRATEGY}/step-{step:05d}/{name}",
                    "image": f"{scene_id}/{STRATEGY}/step-{step:05d}/{name}.png",
                    "target_image": f"{scene_id}/{STRATEGY}/truth/{name}.png",
                    "ref_image": f"{scene_id}/images/{ref_frame.name}",
                    "prompt": PROMPT,
                    "scene": scene_id,
                    "strategy": STRATEGY,
                    "variant": f"step-{step:05d}",
                    "step": step,
                    "view": name,
                    "ref_view": ref_frame.name,
                    "pose": np.round(poses[name], 6).tolist(),
                    "ref_pose": np.round(ref_frame.camera_to_world, 6).tolist(),
                }
            )
    return pairs


def _interpolate(start: np.ndarray, end: np.ndarray, fraction: float) -> np.ndarray:
    """The pose `fraction` of the way from `start` to `end`: centre linearly, rotation by slerp."""
    start_t, end_t = torch.from_numpy(start[:3]), torch.from_numpy(end[:3])
    rotation = quaternion_to_matrix(
        quaternion_slerp(matrix_to_quaternion(start_t[:, :3]), matrix_to_quaternion(end_t[:, :3]), fraction)
    )
    pose = np.eye(4)
    pose[:3, :3] = rotation.numpy()
    pose[:3, 3] = (1 - fraction) * start[:3, 3] + fraction * end[:3, 3]
    return pose


def _write_png(path: Path, rgb: np.ndarray) -> None:
    """Atomic: a killed run never leaves a half-written image behind."""
    temporary = path.with_name(f".{path.name}.tmp.png")
    iio.imwrite(temporary, to_uint8(rgb))
    temporary.replace(path)

