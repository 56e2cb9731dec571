"""Reconstructors: what `difix3d curate` needs from a 3D reconstruction method, and the library's own.

A curation strategy describes a reconstruction as `TrainingViews` (a COLMAP scene, the views to train
on, the views it will render, extra posed images, which SfM points to keep) and asks a `Reconstructor`
to train it, then to render views from the result, optionally as it was at an earlier step.

`SplatReconstructor` is the library's: the in-process 3DGS fitter of `difix3d.rendering.gaussians` (Splatfacto's
schedule; CPU, or gsplat's kernels on CUDA), needing nothing but this package.
`nerfstudio_plugin.reconstructor.NerfstudioReconstructor` trains the `difix3d-gs` nerfstudio method.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pycolmap
import torch
from tqdm.auto import tqdm

from difix3d.data.sfm import camera_to_world
from difix3d.errors import Difix3DError


@dataclass(frozen=True)
class SceneViews:
    """The registered views of a COLMAP scene, sorted by image name."""

    root: Path
    names: list[str]
    poses: np.ndarray  # [N, 4, 4] OpenCV camera-to-world, COLMAP frame
    camera_ids: list[int]

    @property
    def id(self) -> str:
        return scene_id(self.root)

    def image_path(self, name: str) -> Path:
        return self.root / "images" / name

    def index(self, names: Sequence[str]) -> list[int]:
        position = {name: i for i, name in enumerate(self.names)}
        return [position[name] for name in names]


def scene_id(root: Path) -> str:
    """A scene's ID: the name of its resolved folder."""
    return Path(root).resolve().name


def load_scene(root: Path) -> SceneViews:
    """The registered views of the COLMAP scene at `root` (images/ and sparse/0/)."""
    root = Path(root)
    if not root.is_dir():
        raise Difix3DError(f"scene folder not found: {root}")
    sparse = root / "sparse" / "0"
    if not any((sparse / f"cameras.{suffix}").is_file() for suffix in ("bin", "txt")):
        raise Difix3DError(f"scene {root} has no COLMAP model in sparse/0 (cameras.bin or cameras.txt)")
    reconstruction = pycolmap.Reconstruction(str(sparse))
    images = sorted((image for image in reconstruction.images.values() if image.has_pose), key=lambda i: i.name)
    if len(images) < 3:
        raise Difix3DError(f"scene {root}: sparse/0 has {len(images)} registered images; curation needs at least 3")
    missing = [image.name for image in images if not (root / "images" / image.name).is_file()]
    if missing:
        raise Difix3DError(f"scene {root}: {len(missing)} registered image(s) missing in images/, e.g. {missing[0]}")
    return SceneViews(
        root=root,
        names=[image.name for image in images],
        poses=np.stack([camera_to_world(image) for image in images]),
        camera_ids=[image.camera_id for image in images],
    )


@dataclass(frozen=True)
class TrainingViews:
    """One reconstruction to make: train on `train`, later render (some of) `render` (view names)."""

    scene: SceneViews
    train: list[str]
    render: list[str]
    points_from: list[str] | None = None
    """Keep only the SfM points seen by at least two of these views (None: keep all), so views
    outside them add no geometry."""
    extra_views: dict[str, tuple[Path, np.ndarray]] = field(default_factory=dict)
    """Views that are not in the scene: name -> (image file, OpenCV camera-to-world pose); they get the
    camera of the scene's first view."""
    downscale_factor: int = 1
    """Train and render at 1/f resolution (f > 1 needs the scene's images_<f>/ folder)."""

    def image_folders(self) -> list[str]:
        return ["images"] + ([f"images_{self.downscale_factor}"] if self.downscale_factor > 1 else [])


class Reconstructor(Protocol):
    """A 3D reconstruction method, as curation uses it."""

    def train(self, views: TrainingViews, folder: Path, steps: int, checkpoint_steps: Sequence[int] = ()) -> Any:
        """Reconstruct `views.train` in `steps` training steps, keeping the model as it was at each of
        `checkpoint_steps` too; working files go under `folder` (new, empty). Returns a handle for
        `render`."""

    def render(self, reconstruction: Any, names: Sequence[str], step: int | None = None) -> dict[str, Path]:
        """PNG renders of views `names` (from the `render` list it was trained with) by the trained
        model, or by its checkpoint at `step`; view name -> file (under the reconstruction's folder)."""


def derived_reconstruction(views: TrainingViews) -> pycolmap.Reconstruction:
    """The scene's COLMAP model with only the points of `views.points_from` and the extra views added."""
    scene = views.scene
    reconstruction = pycolmap.Reconstruction(str(scene.root / "sparse" / "0"))
    if views.points_from is not None:
        allowed = {reconstruction.find_image_with_name(name).image_id for name in views.points_from}
        for point_id, point in list(reconstruction.points3D.items()):
            if len({element.image_id for element in point.track.elements} & allowed) < 2:
                reconstruction.delete_point3D(point_id)
        if reconstruction.num_points3D() == 0:
            raise Difix3DError(f"scene {scene.id}: no 3D point is seen by two training views; too few training views")
    camera_id = reconstruction.find_image_with_name(scene.names[0]).camera_id
    next_id = max(reconstruction.images) + 1
    for offset, (name, (_, pose)) in enumerate(views.extra_views.items()):
        world_to_camera = np.linalg.inv(pose)
        cam_from_world = pycolmap.Rigid3d(pycolmap.Rotation3d(world_to_camera[:3, :3]), world_to_camera[:3, 3])
        image = pycolmap.Image(name=name, camera_id=camera_id, image_id=next_id + offset)
        reconstruction.add_image_with_trivial_frame(image, cam_from_world)
    return reconstruction


def write_colmap_scene(views: TrainingViews, destination: Path) -> Path:
    """`views` as a COLMAP scene folder: `images/` (and `images_<f>/`) links to the scene's
    photographs plus copies of the extra views' files, `sparse/0` the `derived_reconstruction`."""
    import shutil

    scene = views.scene
    for folder in views.image_folders():
        if not (scene.root / folder).is_dir():
            raise Difix3DError(f"scene {scene.id}: --downscale-factor {views.downscale_factor} needs {scene.root / folder}")
        for name in scene.names:
            link = destination / folder / name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to((scene.root / folder / name).resolve())
        for name, (file, _) in views.extra_views.items():
            (destination / folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, destination / folder / name)
    reconstruction = derived_reconstruction(views)
    sparse = destination / "sparse" / "0"
    sparse.mkdir(parents=True)
    reconstruction.write(str(sparse))
    return destination


# ---------------------------------------------------------------------------- the library's own


@dataclass
class _Splats:
    """A `SplatReconstructor` reconstruction: its views, folder and the Gaussians by step."""

    views: TrainingViews
    folder: Path
    cameras: dict[str, tuple[np.ndarray, np.ndarray, int, int]]  # name -> (camera-to-world, K, width, height)
    params: dict[int | None, dict[str, torch.Tensor]]  # step (None: trained) -> Gaussians


class SplatReconstructor:
    """3DGS by `difix3d.rendering.gaussians.fit_splats` (Splatfacto's schedule), seeded from the SfM points.

    Cameras must be undistorted (PINHOLE, or a model whose distortion is zero): the rasterizer is a
    pinhole projection. Renders fill uncovered pixels with Splatfacto's evaluation background.
    """

    def __init__(self, device: str = "cpu", seed: int = 0, progress: bool = True):
        self.device = device
        self.seed = seed
        self.progress = progress

    def train(self, views: TrainingViews, folder: Path, steps: int, checkpoint_steps: Sequence[int] = ()) -> _Splats:
        from difix3d.images import from_uint8, load_image
        from difix3d.rendering.gaussians import SplatFitConfig, fit_splats

        reconstruction = derived_reconstruction(views)
        images = [torch.from_numpy(load_image(_image_file(views, name))) for name in views.train]
        # With a downscale factor, the image files' size decides the resolution (as nerfstudio's
        # COLMAP dataparser does); otherwise it must be the camera's.
        size = tuple(images[0].shape[1::-1]) if views.downscale_factor > 1 else None
        cameras = {name: _camera(views, reconstruction, name, size) for name in [*views.train, *views.render]}
        for name, image in zip(views.train, images):
            width, height = cameras[name][2:]
            if image.shape[:2] != (height, width):
                raise Difix3DError(f"scene {views.scene.id}: {name} is {image.shape[1]}x{image.shape[0]} pixels, its camera {width}x{height}")
        points = reconstruction.points3D.values()
        xyz = torch.tensor(np.array([point.xyz for point in points]), dtype=torch.float32)
        colours = torch.from_numpy(from_uint8(np.array([point.color for point in points], dtype=np.uint8)))
        snapshots: dict[int | None, dict[str, torch.Tensor]] = {}

        def keep(step: int, params) -> None:
            snapshots[step] = {name: value.detach().clone() for name, value in params.items()}

        params = fit_splats(
            images,
            torch.from_numpy(np.stack([cameras[name][0] for name in views.train])).float(),
            torch.from_numpy(np.stack([cameras[name][1] for name in views.train])).float(),
            xyz, colours, SplatFitConfig(steps=steps, seed=self.seed), on_step=keep, snapshot_steps=checkpoint_steps,
            progress=self.progress, device=self.device,
        )  # fmt: skip
        snapshots[None] = {name: value.detach() for name, value in params.items()}
        folder.mkdir(parents=True, exist_ok=True)
        return _Splats(views, folder, cameras, snapshots)

    def render(self, reconstruction: _Splats, names: Sequence[str], step: int | None = None) -> dict[str, Path]:
        from difix3d.images import save_image
        from difix3d.rendering.gaussians import EVAL_BACKGROUND, SplatFitConfig, render_splats

        if step not in reconstruction.params:
            raise Difix3DError(f"no checkpoint at step {step}; kept: {sorted(s for s in reconstruction.params if s)}")
        unknown = [name for name in names if name not in reconstruction.cameras]
        if unknown:
            raise Difix3DError(f"cannot render {unknown[0]}: not a view of this reconstruction")
        params = reconstruction.params[step]
        device = params["means"].device
        output = reconstruction.folder / "renders" / ("latest" if step is None else f"step{step:09d}")
        files = {}
        for name in tqdm(names, desc="render", unit="view", disable=not self.progress, leave=False):
            pose, K, width, height = reconstruction.cameras[name]
            with torch.no_grad():
                rgb, _, _ = render_splats(
                    params, torch.from_numpy(pose[None]).float().to(device), torch.from_numpy(K[None]).float().to(device),
                    width, height, SplatFitConfig.sh_degree, torch.tensor([EVAL_BACKGROUND], device=device),
                )  # fmt: skip
            files[name] = (output / name).with_suffix(".png")
            save_image(files[name], rgb[0].clamp(0, 1).cpu().numpy())
        return files


def _image_file(views: TrainingViews, name: str) -> Path:
    folder = views.image_folders()[-1]
    if name in views.extra_views:
        return views.extra_views[name][0]
    return views.scene.root / folder / name


def _camera(
    views: TrainingViews, reconstruction: pycolmap.Reconstruction, name: str, size: tuple[int, int] | None
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(camera-to-world [4, 4], K [3, 3], width, height) of view `name`, at (width, height) `size` or the camera's."""
    image = reconstruction.find_image_with_name(name)
    if image is None:
        raise Difix3DError(f"scene {views.scene.id}: view {name} is not in its COLMAP model")
    camera = reconstruction.cameras[image.camera_id]
    if not camera.is_undistorted():
        raise Difix3DError(
            f"scene {views.scene.id}: camera {camera.camera_id} is {camera.model_name} with distortion; the library "
            "reconstructor needs undistorted images (colmap image_undistorter), or use --reconstructor nerfstudio"
        )
    K = np.array(camera.calibration_matrix(), dtype=np.float64)
    width, height = size or (camera.width, camera.height)
    K[:2] *= np.array([[width / camera.width], [height / camera.height]])
    return camera_to_world(image), K, int(width), int(height)
