"""Procedural test scenes with known geometry, and the `difix3d scene` command.

A scene is a textured room (floor, four walls, ceiling) with a few boxes and spheres near its
centre, ray-traced in PyTorch. Everything is a function of one integer seed, so the ground truth
for any camera pose can be rendered again later (`load_ground_truth(dir).render(pose)`).

Conventions (also written into `ground_truth.json`):
- world: metres, z up, floor at z = 0, room centred on the origin;
- camera-to-world poses are OpenCV style: camera x right, y down, z forward (viewing direction);
- pixel (u, v) covers [u, u+1) x [v, v+1); a camera point (X, Y, Z) projects to
  (fx X/Z + cx, fy Y/Z + cy), the same convention as COLMAP.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import imageio.v3 as iio
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from difix3d.data import textures
from difix3d.errors import Difix3DError
from difix3d.images import to_uint8

GENERATOR_NAME = "difix3d.data.scenes"
GENERATOR_VERSION = 1
GROUND_TRUTH_FILE = "ground_truth.json"
# Everything a scene folder holds: --overwrite replaces a folder only if it holds nothing else.
SCENE_ENTRIES = ("images", "sparse", GROUND_TRUTH_FILE)
POSE_CONVENTION = "opencv"
# SIFT needs more pixels than the training views have: SfM runs on renders this many times larger.
SFM_RESOLUTION_SCALE = 2
DEFAULT_HORIZONTAL_FOV_DEG = 65.0

MIN_WIDTH, MIN_HEIGHT, MAX_SIDE = 64, 48, 2048
MIN_TRAIN_VIEWS, MAX_TRAIN_VIEWS, MAX_EVAL_VIEWS = 4, 64, 64

_ROOM_HALF_SIZE = 4.0
_ROOM_HEIGHT = 3.0
_LOOK_AT_HEIGHT = 0.4
_LIGHT_DIRECTION = (0.35, 0.25, 1.0)
# What the surfaces show (`difix3d.data.textures`); "shapes" is the original content.
SCENE_CONTENTS = ("shapes", "materials")
DEFAULT_SCENE_CONTENT = "shapes"
# The materials content's light: ambient share and cast shadows of the objects.
_MATERIALS_AMBIENT = 0.4
# Texel and smallest texture feature sizes (metres): room surfaces are seen from farther away.
_ROOM_TEXEL_M, _ROOM_FEATURE_M = 0.02, 0.12
_OBJECT_TEXEL_M, _OBJECT_FEATURE_M = 0.01, 0.06
_EPS = 1e-6


@dataclass(frozen=True)
class Intrinsics:
    """A pinhole camera: image size in pixels and focal lengths / principal point in pixels."""

    width: int
    height: int
    fx: float
    fy: float
    cx: float
    cy: float

    @classmethod
    def default(cls, width: int, height: int) -> Intrinsics:
        """Square pixels, centred principal point, the scenes' default horizontal field of view."""
        focal = 0.5 * width / math.tan(math.radians(DEFAULT_HORIZONTAL_FOV_DEG) / 2)
        return cls(width, height, focal, focal, width / 2, height / 2)

    def scaled(self, factor: int) -> Intrinsics:
        """The same camera sampled `factor` times more densely in each direction."""
        return Intrinsics(
            self.width * factor, self.height * factor,
            self.fx * factor, self.fy * factor, self.cx * factor, self.cy * factor,
        )

    def matrix(self) -> np.ndarray:
        """The 3x3 calibration matrix K."""
        return np.array([[self.fx, 0, self.cx], [0, self.fy, self.cy], [0, 0, 1]], dtype=np.float64)


@dataclass(frozen=True)
class Render:
    """A ground-truth render: `rgb` (H, W, 3) float32 in [0, 1], `depth` (H, W) float32, the z
    coordinate in the camera frame (distance along the optical axis) at each pixel centre."""

    rgb: np.ndarray
    depth: np.ndarray


@dataclass(frozen=True)
class Box:
    """An upright box resting on the floor, rotated by `yaw_deg` about the vertical axis."""

    center: tuple[float, float, float]
    half_size: tuple[float, float, float]
    yaw_deg: float


@dataclass(frozen=True)
class Sphere:
    center: tuple[float, float, float]
    radius: float


@dataclass(frozen=True)
class SceneLayout:
    """The geometry of a procedural scene and what its surfaces show (textures are regenerated
    from the seed; the geometry does not depend on the content)."""

    seed: int
    room_half_size: float
    room_height: float
    boxes: tuple[Box, ...]
    spheres: tuple[Sphere, ...]
    light_direction: tuple[float, float, float]
    content: str = DEFAULT_SCENE_CONTENT

    def to_json(self) -> dict:
        data = asdict(self)
        if self.content == DEFAULT_SCENE_CONTENT:
            del data["content"]  # so scenes written before there was a choice still match their seed
        return data


def _random_layout(seed: int, content: str = DEFAULT_SCENE_CONTENT) -> SceneLayout:
    if content not in SCENE_CONTENTS:
        raise Difix3DError(f"unknown scene content {content!r}; choose one of {', '.join(SCENE_CONTENTS)}")
    rng = np.random.default_rng([seed, 0])
    boxes: list[Box] = []
    spheres: list[Sphere] = []
    # Footprints as (x, y, radius) circles; rejection sampling keeps objects apart and near the centre.
    footprints: list[tuple[float, float, float]] = []

    def place(radius: float) -> tuple[float, float]:
        for _ in range(1000):
            x, y = rng.uniform(-1.3, 1.3, size=2)
            if math.hypot(x, y) + radius > 1.6:
                continue
            if all(math.hypot(x - fx, y - fy) > radius + fr + 0.08 for fx, fy, fr in footprints):
                footprints.append((x, y, radius))
                return float(x), float(y)
        raise RuntimeError("could not place the scene objects")  # unreachable for these sizes

    for _ in range(3):
        half = rng.uniform([0.17, 0.17, 0.15], [0.42, 0.42, 0.5])
        x, y = place(math.hypot(half[0], half[1]))
        boxes.append(Box((x, y, float(half[2])), tuple(float(h) for h in half), float(rng.uniform(0, 90))))
    for _ in range(2):
        radius = float(rng.uniform(0.2, 0.38))
        x, y = place(radius)
        spheres.append(Sphere((x, y, radius), radius))
    return SceneLayout(
        seed=seed,
        room_half_size=_ROOM_HALF_SIZE,
        room_height=_ROOM_HEIGHT,
        boxes=tuple(boxes),
        spheres=tuple(spheres),
        light_direction=_LIGHT_DIRECTION,
        content=content,
    )


class ProceduralScene:
    """A ray-traced scene: `ProceduralScene.from_seed(seed).render(camera_to_world, intrinsics)`."""

    def __init__(self, layout: SceneLayout) -> None:
        self.layout = layout
        rng = np.random.default_rng([layout.seed, 1])
        room_width = 2 * layout.room_half_size
        # Face order must match the face ids produced by `_trace`.
        faces_m: list[tuple[float, float, float, float]] = [
            (room_width, layout.room_height, _ROOM_TEXEL_M, _ROOM_FEATURE_M),  # x = -half wall
            (room_width, layout.room_height, _ROOM_TEXEL_M, _ROOM_FEATURE_M),  # x = +half wall
            (room_width, layout.room_height, _ROOM_TEXEL_M, _ROOM_FEATURE_M),  # y = -half wall
            (room_width, layout.room_height, _ROOM_TEXEL_M, _ROOM_FEATURE_M),  # y = +half wall
            (room_width, room_width, _ROOM_TEXEL_M, _ROOM_FEATURE_M),  # floor
            (room_width, room_width, _ROOM_TEXEL_M, _ROOM_FEATURE_M),  # ceiling
        ]
        for box in layout.boxes:
            hx, hy, hz = (2 * h for h in box.half_size)
            # Faces of local axis k (min side, max side) span the two other axes.
            for span in ((hy, hz), (hy, hz), (hx, hz), (hx, hz), (hx, hy), (hx, hy)):
                faces_m.append((*span, _OBJECT_TEXEL_M, _OBJECT_FEATURE_M))
        for sphere in layout.spheres:
            faces_m.append((2 * math.pi * sphere.radius, math.pi * sphere.radius, _OBJECT_TEXEL_M, _OBJECT_FEATURE_M))
        self._face_sizes_m = torch.tensor([(w, h) for w, h, _, _ in faces_m], dtype=torch.float32)
        if layout.content == "shapes":
            self._textures = [textures.shapes_texture(rng, *face) for face in faces_m]
        else:
            self._textures = [torch.from_numpy(texture) for texture in self._material_textures(rng, faces_m)]
        light = torch.tensor(layout.light_direction, dtype=torch.float32)
        self._light = light / light.norm()

    def _material_textures(self, rng: np.random.Generator, faces_m) -> list[np.ndarray]:
        """The materials content, face by face in the order of `faces_m`."""
        paint, brick = textures.room_wall_styles(rng)
        surfaces = [
            textures.wall_texture(rng, width, height, texel, paint, brick[wall])
            for wall, (width, height, texel, _) in enumerate(faces_m[:4])
        ]
        surfaces.append(textures.floor_texture(rng, *faces_m[4][:3]))
        surfaces.append(textures.ceiling_texture(rng, *faces_m[5][:3]))
        box_faces = faces_m[6 : 6 + 6 * len(self.layout.boxes)]
        for first in range(0, len(box_faces), 6):
            material = textures.ObjectMaterial(rng)
            surfaces += [material.texture(rng, *face[:3]) for face in box_faces[first : first + 6]]
        surfaces += [textures.sphere_texture(rng, *face[:3]) for face in faces_m[6 + len(box_faces) :]]
        return surfaces

    @classmethod
    def from_seed(cls, seed: int, content: str = DEFAULT_SCENE_CONTENT) -> ProceduralScene:
        """The scene that `seed` describes; the same seed gives the same scene on every machine."""
        return cls(_random_layout(seed, content))

    def render(self, camera_to_world: np.ndarray, intrinsics: Intrinsics, supersample: int = 4) -> Render:
        """Ray-traces one view.

        `camera_to_world`: (4, 4) or (3, 4) OpenCV-convention pose. Each pixel's colour is the mean
        of a regular `supersample` x `supersample` grid of rays inside it (anti-aliasing), so a
        render at 2x resolution with supersample 2, box-averaged 2x2, equals a render at 1x with
        supersample 4.
        """
        pose = torch.as_tensor(np.asarray(camera_to_world, dtype=np.float64)[:3], dtype=torch.float64)
        rotation, origin = pose[:, :3], pose[:, 3].float()
        if supersample < 1:
            raise Difix3DError(f"supersample must be at least 1, got {supersample}")
        half, top = self.layout.room_half_size, self.layout.room_height
        if not (abs(origin[0]) < half and abs(origin[1]) < half and 0 < origin[2] < top):
            raise Difix3DError(f"camera centre {origin.tolist()} is outside the room (|x|, |y| < {half}, 0 < z < {top})")
        rgb = self._render_rgb(rotation, origin, intrinsics, supersample)
        _, depth, _ = self._trace(origin, self._ray_directions(rotation, intrinsics, 1).reshape(-1, 3))
        return Render(rgb.numpy(), depth.reshape(intrinsics.height, intrinsics.width).numpy())

    @staticmethod
    def _ray_directions(rotation: torch.Tensor, intrinsics: Intrinsics, supersample: int) -> torch.Tensor:
        """World-space float32 directions with unit z in the camera frame, so ray t equals depth."""
        offsets = (torch.arange(supersample, dtype=torch.float64) + 0.5) / supersample
        u = (torch.arange(intrinsics.width, dtype=torch.float64)[:, None] + offsets).reshape(-1)
        v = (torch.arange(intrinsics.height, dtype=torch.float64)[:, None] + offsets).reshape(-1)
        x = ((u - intrinsics.cx) / intrinsics.fx)[None, :].expand(v.numel(), -1)
        y = ((v - intrinsics.cy) / intrinsics.fy)[:, None].expand(-1, u.numel())
        camera_dirs = torch.stack([x, y, torch.ones_like(x)], dim=-1)
        return (camera_dirs @ rotation.T).float()  # (H*s, W*s, 3)

    def _render_rgb(
        self, rotation: torch.Tensor, origin: torch.Tensor, intrinsics: Intrinsics, supersample: int
    ) -> torch.Tensor:
        s = supersample
        rows = []
        # Bands of image rows keep memory bounded for large images.
        band = max(1, (1 << 18) // (intrinsics.width * s * s))
        directions = self._ray_directions(rotation, intrinsics, s)
        for top in range(0, intrinsics.height, band):
            dirs = directions[top * s : (top + band) * s]
            colour = self._shade(origin, dirs.reshape(-1, 3)).reshape(*dirs.shape[:2], 3)
            rows.append(colour.reshape(dirs.shape[0] // s, s, intrinsics.width, s, 3).mean(dim=(1, 3)))
        return torch.cat(rows).float()

    def _shade(self, origin: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
        face, t, (uv, normal) = self._trace(origin, dirs, with_surface=True)
        albedo = torch.zeros(dirs.shape[0], 3)
        for face_id in torch.unique(face).tolist():
            selected = face == face_id
            size = self._face_sizes_m[face_id]
            grid = (uv[selected].float() / size * 2 - 1).view(1, 1, -1, 2)
            texture = self._textures[face_id][None]
            sampled = F.grid_sample(texture, grid, mode="bilinear", padding_mode="border", align_corners=True)
            albedo[selected] = sampled[0, :, 0].T
        # Lambertian: view-independent shading that still shows the shapes' form.
        lambert = (normal.float() @ self._light).clamp(min=0)
        if self.layout.content == "shapes":
            return (albedo * (0.55 + 0.45 * lambert)[:, None]).clamp(0, 1)
        points = origin + t[:, None] * dirs
        lit = lambert * self._unshadowed(points + 1e-3 * normal.float(), lambert > 0)
        return (albedo * (_MATERIALS_AMBIENT + (1 - _MATERIALS_AMBIENT) * lit)[:, None]).clamp(0, 1)

    def _unshadowed(self, points: torch.Tensor, facing: torch.Tensor) -> torch.Tensor:
        """1 where the light reaches a point facing it, 0 where an object casts a shadow on it (the
        light is directional and shines through the room, so only the objects cast shadows)."""
        light = self._light.to(points.dtype)
        blocked = torch.zeros(points.shape[0], dtype=torch.bool)
        towards_light = light.expand_as(points)
        for box in self.layout.boxes:
            blocked |= self._intersect_box(box, points, towards_light)[2]
        for sphere in self.layout.spheres:
            offset = points - torch.tensor(sphere.center, dtype=points.dtype)
            half_b = offset @ light
            discriminant = half_b**2 - ((offset * offset).sum(dim=1) - sphere.radius**2)
            blocked |= (discriminant > 0) & (-half_b + discriminant.clamp(min=0).sqrt() > _EPS)
        return (facing & ~blocked).to(points.dtype)

    def _trace(self, origin: torch.Tensor, dirs: torch.Tensor, with_surface: bool = False):
        """Nearest hit of each ray: (face id, t, (uv in metres, unit normal) if `with_surface`)."""
        layout = self.layout
        dirs = torch.where(dirs.abs() < 1e-12, torch.full_like(dirs, 1e-12), dirs)
        lower = torch.tensor([-layout.room_half_size, -layout.room_half_size, 0.0], dtype=dirs.dtype)
        upper = torch.tensor([layout.room_half_size, layout.room_half_size, layout.room_height], dtype=dirs.dtype)
        # Inside the room every ray leaves through the nearest of its three exit planes.
        exits = torch.where(dirs > 0, (upper - origin) / dirs, (lower - origin) / dirs)
        best_t, axis = exits.min(dim=1)
        positive = torch.gather(dirs, 1, axis[:, None])[:, 0] > 0
        best_face = 2 * axis + positive.long()
        first_face = 6
        for box in layout.boxes:
            t, face, hit = self._intersect_box(box, origin, dirs)
            closer = hit & (t < best_t)
            best_t = torch.where(closer, t, best_t)
            best_face = torch.where(closer, first_face + face, best_face)
            first_face += 6
        for sphere in layout.spheres:
            t, hit = self._intersect_sphere(sphere, origin, dirs)
            closer = hit & (t < best_t)
            best_t = torch.where(closer, t, best_t)
            best_face = torch.where(closer, torch.full_like(best_face, first_face), best_face)
            first_face += 1
        if not with_surface:
            return best_face, best_t, None
        points = origin + best_t[:, None] * dirs
        return best_face, best_t, self._surface(points, best_face)

    def _surface(self, points: torch.Tensor, face: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Texture coordinates (metres from the face's corner) and outward normals of hit points."""
        layout = self.layout
        uv = torch.zeros(points.shape[0], 2, dtype=points.dtype)
        normal = torch.zeros_like(points)
        half = layout.room_half_size
        room_uv_axes = ((1, 2), (1, 2), (0, 2), (0, 2), (0, 1), (0, 1))
        room_offsets = torch.tensor([half, half, 0.0], dtype=points.dtype)
        for face_id, (a, b) in enumerate(room_uv_axes):
            selected = face == face_id
            shifted = points[selected] + room_offsets
            uv[selected] = torch.stack([shifted[:, a], shifted[:, b]], dim=1)
            axis, sign = divmod(face_id, 2)
            normal[selected, axis] = 1.0 if sign == 0 else -1.0  # room normals point inwards
        first_face = 6
        for box in layout.boxes:
            selected = (face >= first_face) & (face < first_face + 6)
            if selected.any():
                local_face = face[selected] - first_face
                local, rotation = self._to_box_frame(box, points[selected])
                half_size = torch.tensor(box.half_size, dtype=points.dtype)
                shifted = local + half_size
                axis, side = local_face // 2, local_face % 2
                other = torch.tensor([[1, 2], [0, 2], [0, 1]])[axis]
                uv[selected] = torch.gather(shifted, 1, other)
                local_normal = torch.zeros_like(local)
                local_normal[torch.arange(local.shape[0]), axis] = torch.where(side == 0, -1.0, 1.0).to(points.dtype)
                normal[selected] = local_normal @ rotation  # local -> world: rotation^T applied on the right
            first_face += 6
        for sphere in layout.spheres:
            selected = face == first_face
            if selected.any():
                unit = (points[selected] - torch.tensor(sphere.center, dtype=points.dtype)) / sphere.radius
                unit = unit / unit.norm(dim=1, keepdim=True)
                longitude = torch.atan2(unit[:, 1], unit[:, 0]) + math.pi
                colatitude = torch.acos(unit[:, 2].clamp(-1, 1))
                uv[selected] = torch.stack([longitude, colatitude], dim=1) * sphere.radius
                normal[selected] = unit
            first_face += 1
        return uv, normal

    @staticmethod
    def _to_box_frame(box: Box, vectors: torch.Tensor, translate: bool = True):
        yaw = math.radians(box.yaw_deg)
        # Rows are the box's axes in world coordinates: local = rotation @ (world - centre).
        rotation = torch.tensor(
            [[math.cos(yaw), math.sin(yaw), 0.0], [-math.sin(yaw), math.cos(yaw), 0.0], [0.0, 0.0, 1.0]],
            dtype=vectors.dtype,
        )
        if translate:
            vectors = vectors - torch.tensor(box.center, dtype=vectors.dtype)
        return vectors @ rotation.T, rotation

    def _intersect_box(self, box: Box, origin: torch.Tensor, dirs: torch.Tensor):
        """(t, face, hit) of rays from `origin` (one point (3,), or one per ray (N, 3)) along `dirs` (N, 3)."""
        local_origin, _ = self._to_box_frame(box, origin.reshape(-1, 3))
        local_dirs, _ = self._to_box_frame(box, dirs, translate=False)
        half = torch.tensor(box.half_size, dtype=dirs.dtype)
        t_low = (-half - local_origin) / local_dirs
        t_high = (half - local_origin) / local_dirs
        t_near, axis = torch.minimum(t_low, t_high).max(dim=1)
        t_far = torch.maximum(t_low, t_high).min(dim=1).values
        hit = (t_near <= t_far) & (t_near > _EPS)
        # A ray moving towards +axis enters through the face on the negative side (side 0).
        entering_positive = torch.gather(local_dirs, 1, axis[:, None])[:, 0] < 0
        return t_near, 2 * axis + entering_positive.long(), hit

    @staticmethod
    def _intersect_sphere(sphere: Sphere, origin: torch.Tensor, dirs: torch.Tensor):
        offset = origin - torch.tensor(sphere.center, dtype=dirs.dtype)
        a = (dirs * dirs).sum(dim=1)
        half_b = dirs @ offset
        c = offset @ offset - sphere.radius**2
        discriminant = half_b**2 - a * c
        t = (-half_b - discriminant.clamp(min=0).sqrt()) / a
        return t, (discriminant > 0) & (t > _EPS)


def look_at(eye: np.ndarray, target: np.ndarray, up: tuple[float, float, float] = (0, 0, 1)) -> np.ndarray:
    """OpenCV camera-to-world (4, 4) at `eye` looking at `target`, image y pointing away from `up`."""
    eye, target = np.asarray(eye, dtype=np.float64), np.asarray(target, dtype=np.float64)
    forward = target - eye
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, np.asarray(up, dtype=np.float64))
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    pose = np.eye(4)
    pose[:3, :3] = np.stack([right, down, forward], axis=1)
    pose[:3, 3] = eye
    return pose


def orbit_pose(azimuth_deg: float, radius: float, height: float, target_height: float = _LOOK_AT_HEIGHT) -> np.ndarray:
    """A camera on a circle around the vertical axis (azimuth 0 is +x), looking at the centre."""
    azimuth = math.radians(azimuth_deg)
    eye = np.array([radius * math.cos(azimuth), radius * math.sin(azimuth), height])
    return look_at(eye, np.array([0.0, 0.0, target_height]))


def view_poses(seed: int, num_train: int, num_eval: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Training and evaluation camera-to-world poses.

    Training views sweep one side of the scene (azimuth -50..50 degrees, radius ~2.6 m, eye height
    1.1-1.6 m). Evaluation views are extreme: beyond both ends of that arc (60-80 degrees), farther out
    (3.3-3.6 m) and higher up (2.1-2.5 m), still looking at the objects the training views saw.
    """
    rng = np.random.default_rng([seed, 2])
    train = []
    for i, azimuth in enumerate(np.linspace(-50, 50, num_train)):
        height = (1.15 if i % 2 == 0 else 1.55) + rng.uniform(-0.05, 0.05)
        train.append(orbit_pose(azimuth + rng.uniform(-2, 2), 2.6 + rng.uniform(-0.1, 0.1), height))
    evaluation = []
    for i in range(num_eval):
        side = 1 if i % 2 == 0 else -1
        magnitude = 60 + 20 * ((i // 2) / max(1, (num_eval - 1) // 2))
        evaluation.append(
            orbit_pose(side * (magnitude + rng.uniform(-2, 2)), rng.uniform(3.3, 3.6), rng.uniform(2.1, 2.5))
        )
    return train, evaluation


@dataclass(frozen=True)
class Frame:
    """One rendered view: its image path relative to the scene folder, split and true pose."""

    file_path: str
    split: str
    camera_to_world: np.ndarray = field(repr=False)

    @property
    def name(self) -> str:
        return Path(self.file_path).name


@dataclass
class GroundTruth:
    """The contents of `ground_truth.json`, plus the scene to render any other view of it."""

    seed: int
    intrinsics: Intrinsics
    frames: list[Frame]
    layout: SceneLayout
    _scene: ProceduralScene | None = field(default=None, repr=False)

    @property
    def scene(self) -> ProceduralScene:
        if self._scene is None:
            self._scene = ProceduralScene(self.layout)
        return self._scene

    def frame(self, name: str) -> Frame:
        """The frame whose image file is called `name` (e.g. "frame_eval_0003.png")."""
        for frame in self.frames:
            if frame.name == name:
                return frame
        raise Difix3DError(f"no frame named {name!r} in the ground truth")

    def render(self, camera_to_world: np.ndarray, intrinsics: Intrinsics | None = None, supersample: int = 4) -> Render:
        """Ground truth at any OpenCV camera-to-world pose in the scene's world frame (default:
        the scene's own intrinsics; the training images are exactly these renders, quantised)."""
        return self.scene.render(camera_to_world, intrinsics or self.intrinsics, supersample)

    def to_json(self) -> dict:
        return {
            "generator": GENERATOR_NAME,
            "generator_version": GENERATOR_VERSION,
            "convention": {
                "camera_to_world": POSE_CONVENTION,
                "camera_axes": "x right, y down, z forward (viewing direction)",
                "world": "metres, z up, floor at z = 0",
                "pixels": "pixel (u, v) covers [u, u+1) x [v, v+1); x_image = fx * X / Z + cx",
            },
            "seed": self.seed,
            "width": self.intrinsics.width,
            "height": self.intrinsics.height,
            "intrinsics": {k: getattr(self.intrinsics, k) for k in ("fx", "fy", "cx", "cy")},
            "frames": [
                {"file_path": f.file_path, "split": f.split, "camera_to_world": f.camera_to_world.tolist()}
                for f in self.frames
            ],
            "scene": self.layout.to_json(),
        }


def load_ground_truth(scene_dir: str | Path) -> GroundTruth:
    """Reads `ground_truth.json` of a scene folder written by `build_scene`."""
    path = Path(scene_dir) / GROUND_TRUTH_FILE
    if not path.is_file():
        raise Difix3DError(f"{path} not found: not a scene made by `difix3d scene`")
    data = json.loads(path.read_text())
    if data.get("generator_version") != GENERATOR_VERSION or data["convention"]["camera_to_world"] != POSE_CONVENTION:
        raise Difix3DError(f"{path} was written by another scene generator version")
    layout = _random_layout(int(data["seed"]), data["scene"].get("content", DEFAULT_SCENE_CONTENT))
    if json.loads(json.dumps(layout.to_json())) != data["scene"]:
        raise Difix3DError(f"{path}: the scene parameters do not match seed {data['seed']} of this generator")
    intrinsics = Intrinsics(int(data["width"]), int(data["height"]), **{k: float(v) for k, v in data["intrinsics"].items()})
    frames = [Frame(f["file_path"], f["split"], np.array(f["camera_to_world"], dtype=np.float64)) for f in data["frames"]]
    return GroundTruth(int(data["seed"]), intrinsics, frames, layout)


def _check_arguments(out: Path, width: int, height: int, num_train: int, num_eval: int, overwrite: bool) -> None:
    if not (MIN_WIDTH <= width <= MAX_SIDE and MIN_HEIGHT <= height <= MAX_SIDE):
        raise Difix3DError(
            f"image size {width}x{height} is out of range: width {MIN_WIDTH}-{MAX_SIDE}, height {MIN_HEIGHT}-{MAX_SIDE}"
        )
    if not MIN_TRAIN_VIEWS <= num_train <= MAX_TRAIN_VIEWS:
        raise Difix3DError(f"--num-train {num_train} is out of range {MIN_TRAIN_VIEWS}-{MAX_TRAIN_VIEWS}")
    if not 0 <= num_eval <= MAX_EVAL_VIEWS:
        raise Difix3DError(f"--num-eval {num_eval} is out of range 0-{MAX_EVAL_VIEWS}")
    if out.exists() and not out.is_dir():
        raise Difix3DError(f"{out} exists and is not a folder")
    _refuse_protected_folder(out)
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise Difix3DError(f"{out} exists and is not empty; pass --overwrite to replace it")
        _refuse_foreign_folder(out)


def _refuse_protected_folder(out: Path) -> None:
    """The working folder, its parents, the home folder and its parents are never a scene folder:
    the scene replaces the whole folder."""
    resolved = out.resolve()
    for protected, label in ((Path.cwd().resolve(), "the working folder"), (Path.home().resolve(), "the home folder")):
        if resolved == protected or resolved in protected.parents:
            what = label if resolved == protected else f"a parent of {label}"
            raise Difix3DError(f"--out {out} is {what}; name a new folder for the scene, e.g. --out data/room")


def _refuse_foreign_folder(out: Path) -> None:
    """--overwrite replaces only a scene this command wrote, holding nothing else."""
    try:
        generator = json.loads((out / GROUND_TRUTH_FILE).read_text()).get("generator")
    except (OSError, ValueError, AttributeError):
        generator = None
    if generator != GENERATOR_NAME:
        raise Difix3DError(
            f"{out} is not a scene written by `difix3d scene` (no {GROUND_TRUTH_FILE} of it): --overwrite "
            "replaces only such a scene; choose another --out or empty the folder yourself"
        )
    foreign = sorted(entry.name for entry in out.iterdir() if entry.name not in SCENE_ENTRIES)
    if foreign:
        raise Difix3DError(
            f"{out} holds files that `difix3d scene` did not write ({', '.join(foreign[:5])}): --overwrite "
            "would delete them; move them out or choose another --out"
        )


def build_scene(
    out: str | Path,
    seed: int = 0,
    width: int = 160,
    height: int = 120,
    num_train: int = 12,
    num_eval: int = 8,
    overwrite: bool = False,
    log=print,
    sfm: bool = True,
    content: str = DEFAULT_SCENE_CONTENT,
) -> GroundTruth:
    """Renders a procedural scene, runs SfM on it and writes the scene folder `out`.

    Layout: `images/frame_{train,eval}_XXXX.png` (width x height), `sparse/0` (COLMAP model from
    pycolmap SfM over all images, one PINHOLE camera, in the units and frame SfM chose) and
    `ground_truth.json` (true poses, intrinsics, seed, scene parameters). The folder is assembled
    next to `out` and moved into place only when everything succeeded. With `sfm=False` the folder
    has no `sparse/0` (enough for the ground-truth data engine, which knows the true poses).
    `content` chooses what the surfaces show (`SCENE_CONTENTS`); the geometry depends on the seed only.
    """
    from difix3d.data import sfm as structure_from_motion  # pycolmap is only needed here

    out = Path(out)
    _check_arguments(out, width, height, num_train, num_eval, overwrite)
    started = time.perf_counter()
    intrinsics = Intrinsics.default(width, height)
    sfm_intrinsics = intrinsics.scaled(SFM_RESOLUTION_SCALE)
    train_poses, eval_poses = view_poses(seed, num_train, num_eval)
    frames = [Frame(f"images/frame_train_{i:04d}.png", "train", p) for i, p in enumerate(train_poses)]
    frames += [Frame(f"images/frame_eval_{i:04d}.png", "eval", p) for i, p in enumerate(eval_poses)]

    log(f"Building scene (seed {seed}, {content}, {num_train} train + {num_eval} eval views at {width}x{height})")
    scene = ProceduralScene.from_seed(seed, content)
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    # Assembled next to OUT; created with mkdir (not mkdtemp, which makes it 0700) so the scene
    # gets the user's usual permissions.
    staging = out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.partial"
    staging.mkdir()
    try:
        (staging / "images").mkdir()
        sfm_images = staging / "sfm_images"
        sfm_images.mkdir()
        for frame in tqdm(frames, desc="Rendering views", unit="view", leave=False):
            # SfM sees 2x renders; the training image is their 2x2 box average (= a 1x render).
            big = scene.render(frame.camera_to_world, sfm_intrinsics, supersample=2).rgb
            small = big.reshape(height, SFM_RESOLUTION_SCALE, width, SFM_RESOLUTION_SCALE, 3).mean(axis=(1, 3))
            iio.imwrite(sfm_images / frame.name, to_uint8(big))
            iio.imwrite(staging / frame.file_path, to_uint8(small))
        log(f"Rendered {len(frames)} views ({time.perf_counter() - started:.1f} s)")

        if sfm:
            reconstruction = structure_from_motion.reconstruct(sfm_images, staging / "sfm_work", sfm_intrinsics, seed=seed, log=log)
            structure_from_motion.rescale_reconstruction(reconstruction, 1 / SFM_RESOLUTION_SCALE)
            (staging / "sparse" / "0").mkdir(parents=True)
            reconstruction.write_binary(str(staging / "sparse" / "0"))
            shutil.rmtree(staging / "sfm_work")
        shutil.rmtree(sfm_images)

        ground_truth = GroundTruth(seed, intrinsics, frames, scene.layout, scene)
        (staging / GROUND_TRUTH_FILE).write_text(json.dumps(ground_truth.to_json(), indent=1))
        if out.exists():  # an empty folder, or (--overwrite) a scene of ours: checked above
            replaced = staging.with_suffix(".replaced")
            out.rename(replaced)
            staging.rename(out)
            shutil.rmtree(replaced)
        else:
            staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(f"Wrote {out} in {time.perf_counter() - started:.1f} s")
    return ground_truth


def scene_command(
    out: Path,
    seed: int = 0,
    width: int = 160,
    height: int = 120,
    num_train: int = 12,
    num_eval: int = 8,
    overwrite: bool = False,
    content: Literal["shapes", "materials"] = DEFAULT_SCENE_CONTENT,
) -> None:
    """Render a procedural test scene and reconstruct it with COLMAP SfM (pycolmap).

    Writes OUT/images/frame_train_XXXX.png (views sweeping one side of the scene),
    OUT/images/frame_eval_XXXX.png (extreme held-out views: beyond the sweep, farther out, higher up),
    OUT/sparse/0 (the SfM model) and OUT/ground_truth.json (true OpenCV camera-to-world poses).

    Args:
        out: Scene folder to create.
        seed: Scene and camera seed; the same seed gives the same images.
        width: Image width in pixels (SfM runs at twice this size).
        height: Image height in pixels.
        num_train: Number of training views.
        num_eval: Number of held-out evaluation views.
        overwrite: Replace OUT if it is a scene written by this command (and holds nothing else).
        content: What the surfaces show: "shapes" (colour noise and scattered shapes) or "materials" (rooms of wood, tiles, plaster, framed photographs, fabric and marble, with cast shadows).
    """
    build_scene(out, seed, width, height, num_train, num_eval, overwrite, content=content)
