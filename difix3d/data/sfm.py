"""Structure from motion with pycolmap, and comparison of SfM poses with ground truth.

`reconstruct` runs the COLMAP pipeline (SIFT extraction, exhaustive matching, incremental mapping)
with one shared PINHOLE camera, single-threaded and seeded so that a scene is reproducible.
`align_to_ground_truth` fits the similarity transform (Umeyama) from SfM camera centres to true
ones and reports per-image rotation and centre errors.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pycolmap

from difix3d.errors import Difix3DError


class Intrinsics(Protocol):
    """A pinhole calibration in pixels (e.g. `difix3d.data.scenes.Intrinsics`)."""

    fx: float
    fy: float
    cx: float
    cy: float


def reconstruct(image_dir: Path, work_dir: Path, intrinsics: Intrinsics, seed: int = 0, log=print) -> pycolmap.Reconstruction:
    """SfM over every image in `image_dir`; fails unless all of them are registered in one model.

    `intrinsics` is the calibration of the shared PINHOLE camera; it is kept fixed (a calibrated
    camera), which keeps the model in exactly the training images' pixel geometry.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    with _colmap_min_log_level(1):  # our own log lines report progress
        return _reconstruct(image_dir, work_dir, intrinsics, seed, log)


@contextlib.contextmanager
def _colmap_min_log_level(level: int):
    """pycolmap's (process-wide) log threshold set to `level` for the block, then restored."""
    previous = pycolmap.logging.minloglevel
    pycolmap.logging.minloglevel = level
    try:
        yield
    finally:
        pycolmap.logging.minloglevel = previous


def _reconstruct(image_dir: Path, work_dir: Path, intrinsics: Intrinsics, seed: int, log) -> pycolmap.Reconstruction:
    database = work_dir / "database.db"
    image_names = sorted(p.name for p in image_dir.iterdir())
    started = time.perf_counter()

    reader = pycolmap.ImageReaderOptions(
        camera_model="PINHOLE",
        camera_params=",".join(str(v) for v in (intrinsics.fx, intrinsics.fy, intrinsics.cx, intrinsics.cy)),
    )
    extraction = pycolmap.FeatureExtractionOptions(num_threads=1, use_gpu=False)
    pycolmap.extract_features(
        database, image_dir, image_names=image_names, camera_mode=pycolmap.CameraMode.SINGLE,
        reader_options=reader, extraction_options=extraction, device=pycolmap.Device.cpu,
    )
    log(f"SfM: extracted SIFT features from {len(image_names)} images ({time.perf_counter() - started:.1f} s)")

    matching = pycolmap.FeatureMatchingOptions(num_threads=1, use_gpu=False)
    verification = pycolmap.TwoViewGeometryOptions()
    verification.ransac.random_seed = seed
    pycolmap.match_exhaustive(
        database, matching_options=matching, verification_options=verification, device=pycolmap.Device.cpu
    )
    log(f"SfM: matched all image pairs ({time.perf_counter() - started:.1f} s)")

    # The renderer's calibration is exact, so SfM estimates poses and structure with it held fixed.
    # multiple_models (COLMAP's default): when the first model cannot grow, e.g. from an initial pair
    # that sees one plane (the benchmark generator's seed 1007: 2 of 20 images), the mapper starts
    # another from the images left; the largest model is kept. A first model that takes every image
    # ends the mapping as before.
    mapping = pycolmap.IncrementalPipelineOptions(
        num_threads=1, random_seed=seed, multiple_models=True, ba_refine_focal_length=False
    )
    mapping.mapper.abs_pose_refine_focal_length = False
    mapping.mapper.num_threads = 1
    mapping.mapper.random_seed = seed
    mapping.triangulation.random_seed = seed
    models = pycolmap.incremental_mapping(database, image_dir, work_dir / "sparse", options=mapping)
    best = max(models.values(), key=lambda model: model.num_reg_images(), default=None)
    registered = {image.name for image in best.images.values() if image.has_pose} if best else set()
    missing = [name for name in image_names if name not in registered]
    if missing:
        raise Difix3DError(
            f"SfM registered {len(registered)} of {len(image_names)} images; not registered: {', '.join(missing)}"
        )
    log(
        f"SfM: registered all {len(image_names)} images, {best.num_points3D()} points, "
        f"reprojection error {best.compute_mean_reprojection_error():.2f} px ({time.perf_counter() - started:.1f} s)"
    )
    return best


def rescale_reconstruction(reconstruction: pycolmap.Reconstruction, factor: float) -> None:
    """Rescales cameras and 2D observations in place, as if the images were resized by `factor`.

    Pixel coordinates follow COLMAP's convention (pixel centres at half-integers), so every image
    coordinate simply scales by `factor`.
    """
    for camera in reconstruction.cameras.values():
        camera.rescale(factor)
    for image in reconstruction.images.values():
        for point in image.points2D:  # references into the image: updated in place
            point.xy = point.xy * factor


def camera_to_world(image: pycolmap.Image) -> np.ndarray:
    """The (4, 4) OpenCV camera-to-world pose of a registered COLMAP image."""
    pose = np.eye(4)
    pose[:3, :] = image.cam_from_world().inverse().matrix()
    return pose


def read_poses(sparse_dir: str | Path) -> dict[str, np.ndarray]:
    """Image name -> (4, 4) OpenCV camera-to-world pose, for the registered images of a COLMAP model."""
    reconstruction = pycolmap.Reconstruction(str(sparse_dir))
    return {image.name: camera_to_world(image) for image in reconstruction.images.values() if image.has_pose}


def umeyama(source: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Least-squares similarity (scale, rotation, translation) with target ~= scale * R @ source + t.

    Umeyama (1991), "Least-squares estimation of transformation parameters between two point
    patterns". `source` and `target` are (N, 3) with N >= 3 points not all on a line.
    """
    source, target = np.asarray(source, dtype=np.float64), np.asarray(target, dtype=np.float64)
    source_mean, target_mean = source.mean(axis=0), target.mean(axis=0)
    source_centred, target_centred = source - source_mean, target - target_mean
    covariance = target_centred.T @ source_centred / len(source)
    u, singular_values, vt = np.linalg.svd(covariance)
    reflection = np.eye(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        reflection[2, 2] = -1
    rotation = u @ reflection @ vt
    source_variance = (source_centred**2).sum() / len(source)
    scale = float(np.trace(np.diag(singular_values) @ reflection) / source_variance)
    translation = target_mean - scale * rotation @ source_mean
    return scale, rotation, translation


@dataclass(frozen=True)
class PoseAlignment:
    """SfM poses mapped into the ground-truth frame, and how far they are from the truth."""

    scale: float
    rotation: np.ndarray
    translation: np.ndarray
    names: list[str]
    rotation_errors_deg: np.ndarray
    centre_errors: np.ndarray  # metres in the ground-truth frame

    def sfm_to_ground_truth(self, sfm_camera_to_world: np.ndarray) -> np.ndarray:
        """Maps an SfM-frame OpenCV camera-to-world pose into the ground-truth world frame."""
        pose = np.eye(4)
        pose[:3, :3] = self.rotation @ sfm_camera_to_world[:3, :3]
        pose[:3, 3] = self.scale * self.rotation @ sfm_camera_to_world[:3, 3] + self.translation
        return pose


def align_to_ground_truth(sfm_poses: dict[str, np.ndarray], true_poses: dict[str, np.ndarray]) -> PoseAlignment:
    """Fits SfM camera centres to the true ones (Umeyama) over the images both have."""
    names = sorted(set(sfm_poses) & set(true_poses))
    if len(names) < 3:
        raise Difix3DError(f"need at least 3 common images to align poses, got {len(names)}")
    sfm = np.stack([sfm_poses[n] for n in names])
    truth = np.stack([true_poses[n] for n in names])
    scale, rotation, translation = umeyama(sfm[:, :3, 3], truth[:, :3, 3])
    aligned_rotations = rotation @ sfm[:, :3, :3]
    relative = np.einsum("nji,njk->nik", truth[:, :3, :3], aligned_rotations)
    cosines = np.clip((np.trace(relative, axis1=1, axis2=2) - 1) / 2, -1, 1)
    aligned_centres = scale * sfm[:, :3, 3] @ rotation.T + translation
    return PoseAlignment(
        scale=scale,
        rotation=rotation,
        translation=translation,
        names=names,
        rotation_errors_deg=np.degrees(np.arccos(cosines)),
        centre_errors=np.linalg.norm(aligned_centres - truth[:, :3, 3], axis=1),
    )
