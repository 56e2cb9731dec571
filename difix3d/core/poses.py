"""Camera pose maths for the progressive 3D update: distances, nearest poses, slerp, trajectories.

Poses are camera-to-world matrices as torch tensors of shape [..., 3, 4] (a [..., 4, 4] matrix is
accepted wherever a pose is read): the rotation columns are the camera axes in world coordinates and
the last column is the camera centre. Nothing here depends on the camera-axis convention, so
nerfstudio's OpenGL poses and OpenCV poses work alike, as long as the poses compared share one.
Quaternions are [..., 4] tensors in (w, x, y, z) order.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from difix3d.errors import Difix3DError


def as_pose(poses: Tensor) -> Tensor:
    """Return `poses` as [..., 3, 4] camera-to-world matrices, dropping the bottom row of a 4x4 matrix."""
    if poses.ndim < 2 or poses.shape[-1] != 4 or poses.shape[-2] not in (3, 4):
        raise Difix3DError(f"poses must have shape [..., 3, 4] or [..., 4, 4], got {list(poses.shape)}")
    return poses[..., :3, :]


def to_homogeneous(poses: Tensor) -> Tensor:
    """Return `poses` as [..., 4, 4] matrices with the bottom row (0, 0, 0, 1)."""
    poses = as_pose(poses)
    bottom = torch.zeros(*poses.shape[:-2], 1, 4, dtype=poses.dtype, device=poses.device)
    bottom[..., 0, 3] = 1
    return torch.cat([poses, bottom], dim=-2)


def make_pose(rotation: Tensor, centre: Tensor) -> Tensor:
    """Assemble [..., 3, 4] poses from rotations [..., 3, 3] and camera centres [..., 3]."""
    batch = torch.broadcast_shapes(rotation.shape[:-2], centre.shape[:-1])
    return torch.cat([rotation.expand(*batch, 3, 3), centre.expand(*batch, 3)[..., None]], dim=-1)


def rotation_angle(poses_a: Tensor, poses_b: Tensor) -> Tensor:
    """Angle in radians, in [0, pi], of the relative rotation between two (broadcast) sets of poses."""
    rotation_a, rotation_b = as_pose(poses_a)[..., :3], as_pose(poses_b)[..., :3]
    relative = rotation_a.transpose(-1, -2) @ rotation_b
    cos_angle = (relative.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
    # |axis * sin(angle)| from the skew part: atan2 keeps the angle accurate near 0 and pi, where acos is not.
    skew = torch.stack(
        [
            relative[..., 2, 1] - relative[..., 1, 2],
            relative[..., 0, 2] - relative[..., 2, 0],
            relative[..., 1, 0] - relative[..., 0, 1],
        ],
        dim=-1,
    )
    sin_angle = torch.linalg.vector_norm(skew, dim=-1) / 2
    return torch.atan2(sin_angle, cos_angle)


def translation_distance(poses_a: Tensor, poses_b: Tensor) -> Tensor:
    """Euclidean distance between the camera centres of two (broadcast) sets of poses, in scene units."""
    return torch.linalg.vector_norm(as_pose(poses_a)[..., 3] - as_pose(poses_b)[..., 3], dim=-1)


def pose_distance(poses_a: Tensor, poses_b: Tensor) -> Tensor:
    """Combined pose distance: translation distance (scene units) + rotation angle (radians)."""
    return translation_distance(poses_a, poses_b) + rotation_angle(poses_a, poses_b)


def pairwise_pose_distance(poses_a: Tensor, poses_b: Tensor) -> Tensor:
    """Combined distances [N, M] between every pose of `poses_a` [N, 3, 4] and of `poses_b` [M, 3, 4]."""
    return pose_distance(as_pose(poses_a)[:, None], as_pose(poses_b)[None, :])


def nearest_poses(queries: Tensor, candidates: Tensor, k: int = 1) -> tuple[Tensor, Tensor]:
    """The `k` candidates nearest each query by the combined distance, nearest first.

    Args:
        queries: [N, 3, 4] poses.
        candidates: [M, 3, 4] poses, M >= k.
        k: how many neighbours per query (e.g. the number of Difix reference views).

    Returns:
        indices [N, k] (long) into `candidates` and their distances [N, k]. Ties go to the lower index.
    """
    num_candidates = as_pose(candidates).shape[0]
    if not 1 <= k <= num_candidates:
        raise Difix3DError(f"cannot pick {k} nearest poses out of {num_candidates}")
    distances = pairwise_pose_distance(queries, candidates)
    # A stable sort makes the choice deterministic when distances tie (e.g. duplicated cameras).
    sorted_distances, indices = torch.sort(distances, dim=-1, stable=True)
    return indices[:, :k], sorted_distances[:, :k]


def matrix_to_quaternion(rotation: Tensor) -> Tensor:
    """Unit quaternions [..., 4] (w, x, y, z), with w >= 0, of rotation matrices [..., 3, 3]."""
    (m00, m01, m02), (m10, m11, m12), (m20, m21, m22) = (row.unbind(-1) for row in rotation.unbind(-2))
    # 4w², 4x², 4y², 4z²; row i of `candidates` is 4 q_i q, an accurate solution where q_i² is largest.
    leading = torch.stack([1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], -1)
    candidates = torch.stack(
        [
            torch.stack([leading[..., 0], m21 - m12, m02 - m20, m10 - m01], -1),
            torch.stack([m21 - m12, leading[..., 1], m01 + m10, m02 + m20], -1),
            torch.stack([m02 - m20, m01 + m10, leading[..., 2], m12 + m21], -1),
            torch.stack([m10 - m01, m02 + m20, m12 + m21, leading[..., 3]], -1),
        ],
        dim=-2,
    )
    best = leading.argmax(dim=-1)[..., None, None].expand(*leading.shape[:-1], 1, 4)
    quaternion = torch.gather(candidates, -2, best).squeeze(-2)
    quaternion = quaternion / torch.linalg.vector_norm(quaternion, dim=-1, keepdim=True)
    return torch.where(quaternion[..., :1] < 0, -quaternion, quaternion)


def quaternion_to_matrix(quaternion: Tensor) -> Tensor:
    """Rotation matrices [..., 3, 3] of quaternions [..., 4] (w, x, y, z); normalises them first."""
    quaternion = quaternion / torch.linalg.vector_norm(quaternion, dim=-1, keepdim=True)
    w, x, y, z = quaternion.unbind(-1)
    rows = [
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ]
    return torch.stack([torch.stack(row, -1) for row in rows], -2)


def quaternion_slerp(start: Tensor, end: Tensor, fraction: Tensor | float) -> Tensor:
    """Spherical linear interpolation between unit quaternions [..., 4] (all arguments broadcast).

    Takes the shorter arc: `end` is negated when it lies on the other hemisphere, so `q` and `-q`
    (the same rotation) interpolate to a constant. fraction 0 gives `start`; fraction 1 gives `end`
    up to sign, i.e. the same rotation.
    """
    fraction = torch.as_tensor(fraction, dtype=start.dtype, device=start.device)
    start = start / torch.linalg.vector_norm(start, dim=-1, keepdim=True)
    end = end / torch.linalg.vector_norm(end, dim=-1, keepdim=True)
    end = torch.where((start * end).sum(-1, keepdim=True) < 0, -end, end)
    # Half the arc angle from chord lengths: accurate for nearly equal quaternions, unlike acos(dot).
    half_angle = torch.atan2(
        torch.linalg.vector_norm(start - end, dim=-1, keepdim=True),
        torch.linalg.vector_norm(start + end, dim=-1, keepdim=True),
    )
    angle = 2 * half_angle
    fraction = fraction[..., None]
    sin_angle = torch.sin(angle)
    nearly_equal = sin_angle < 1e-6
    safe_sin = torch.where(nearly_equal, torch.ones_like(sin_angle), sin_angle)
    weight_start = torch.where(nearly_equal, 1 - fraction, torch.sin((1 - fraction) * angle) / safe_sin)
    weight_end = torch.where(nearly_equal, fraction, torch.sin(fraction * angle) / safe_sin)
    result = weight_start * start + weight_end * end
    return result / torch.linalg.vector_norm(result, dim=-1, keepdim=True)


def shift_toward(current: Tensor, target: Tensor, step: float, jump: bool = True) -> tuple[Tensor, Tensor]:
    """Move poses one step toward their targets, as the reference release's `shift_poses` does.

    A pose whose combined distance (translation + rotation angle) to its target is at most `step`
    lands exactly on the target. Otherwise the camera centre moves `step` scene units along the line
    to the target's centre and the rotation slerps by the fraction step / translation distance
    (capped at 1); with `jump` (the release's behaviour), a centre that would be left within one
    step of the target's jumps onto it (the rotation does not), with `jump=False` it moves exactly
    one step.

    Args:
        current: [..., 3, 4] poses to move.
        target: [..., 3, 4] poses to move toward (broadcast against `current`).
        step: translation step in scene units, > 0.
        jump: the release's translation jump (see above).

    Returns:
        the moved poses [..., 3, 4] and a bool mask [...] of the poses that landed on their target.
    """
    if not step > 0:
        raise Difix3DError(f"the pose step must be positive, got {step}")
    current, target = torch.broadcast_tensors(as_pose(current), as_pose(target))
    distance = translation_distance(current, target)
    fraction = (step / distance.clamp_min(torch.finfo(distance.dtype).tiny)).clamp(max=1)
    snapped = (pose_distance(current, target) <= step) | (fraction >= 1)
    fraction = torch.where(snapped, torch.ones_like(fraction), fraction)

    centre = current[..., 3] + fraction[..., None] * (target[..., 3] - current[..., 3])
    if jump:
        centre = torch.where((distance - step <= step)[..., None], target[..., 3], centre)
    rotation = quaternion_to_matrix(
        quaternion_slerp(matrix_to_quaternion(current[..., :3]), matrix_to_quaternion(target[..., :3]), fraction)
    )
    moved = make_pose(rotation, centre)
    # Snapped poses take the target exactly, free of any round-off from the quaternion round trip.
    return torch.where(snapped[..., None, None], target, moved), snapped


def interpolate_trajectory(poses: Tensor, num_poses: int) -> Tensor:
    """A smooth trajectory of `num_poses` poses through `poses` [K, 3, 4], in the given order.

    Camera centres follow a uniform Catmull-Rom spline (the ends extended by reflection), rotations
    slerp between consecutive poses. Samples are evenly spaced in the spline parameter, the first and
    last on the first and last pose; when (num_poses - 1) is a multiple of (K - 1), every input pose is
    one of the samples.
    """
    poses = as_pose(poses)
    if poses.ndim != 3 or poses.shape[0] < 1:
        raise Difix3DError(f"a trajectory needs poses of shape [K, 3, 4] with K >= 1, got {list(poses.shape)}")
    if num_poses < 1:
        raise Difix3DError(f"a trajectory needs at least one pose, got {num_poses}")
    num_keys = poses.shape[0]
    if num_keys == 1:
        return poses.expand(num_poses, 3, 4).clone()

    parameter = torch.linspace(0, num_keys - 1, num_poses, dtype=poses.dtype, device=poses.device)
    segment = parameter.floor().long().clamp(max=num_keys - 2)
    local = (parameter - segment.to(poses.dtype))[:, None]

    centres = poses[:, :, 3]
    padded = torch.cat([2 * centres[:1] - centres[1:2], centres, 2 * centres[-1:] - centres[-2:-1]])
    p0, p1, p2, p3 = (padded[segment + offset] for offset in range(4))
    centre = 0.5 * (
        2 * p1
        + (p2 - p0) * local
        + (2 * p0 - 5 * p1 + 4 * p2 - p3) * local**2
        + (3 * p1 - p0 - 3 * p2 + p3) * local**3
    )

    quaternions = matrix_to_quaternion(poses[:, :, :3])
    rotation = quaternion_to_matrix(quaternion_slerp(quaternions[segment], quaternions[segment + 1], local[:, 0]))
    return make_pose(rotation, centre)


@dataclass(frozen=True)
class CameraPath:
    """Cameras read from a nerfstudio camera-path JSON (as written by the viewer's render panel)."""

    poses: Tensor
    """[N, 3, 4] camera-to-world poses in nerfstudio's (OpenGL, dataparser-transformed) world frame."""
    vertical_fov_degrees: Tensor
    """[N] vertical field of view of each camera, in degrees."""
    aspect: Tensor
    """[N] width / height of each camera."""
    render_height: int | None
    """Image height the path asks for, if given."""
    render_width: int | None
    """Image width the path asks for, if given."""


def load_camera_path(path: str | Path) -> CameraPath:
    """Read a nerfstudio camera-path JSON: a `camera_path` list of {camera_to_world (16 numbers, a
    row-major 4x4), fov (vertical, degrees), aspect}, plus optional render_height / render_width."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise Difix3DError(f"camera path file not found: {path}") from None
    except (OSError, json.JSONDecodeError) as error:
        raise Difix3DError(f"cannot read camera path {path}: {error}") from None

    cameras = data.get("camera_path") if isinstance(data, dict) else None
    if not isinstance(cameras, list) or not cameras:
        raise Difix3DError(f"{path} has no non-empty 'camera_path' list; is it a nerfstudio camera path?")
    matrices, fovs, aspects = [], [], []
    for number, camera in enumerate(cameras):
        try:
            matrix = torch.tensor(camera["camera_to_world"], dtype=torch.float32)
            fov, aspect = float(camera["fov"]), float(camera.get("aspect", 1.0))
        except (KeyError, TypeError, ValueError) as error:
            raise Difix3DError(f"{path}: camera {number} lacks a numeric camera_to_world/fov ({error})") from None
        if matrix.numel() != 16:
            raise Difix3DError(f"{path}: camera {number} camera_to_world has {matrix.numel()} numbers, expected 16")
        if not (math.isfinite(fov) and 0 < fov < 180):
            raise Difix3DError(f"{path}: camera {number} has fov {fov}, expected degrees in (0, 180)")
        matrices.append(matrix.view(4, 4)[:3])
        fovs.append(fov)
        aspects.append(aspect)

    def optional_size(key: str) -> int | None:
        return int(data[key]) if data.get(key) is not None else None

    return CameraPath(
        poses=torch.stack(matrices),
        vertical_fov_degrees=torch.tensor(fovs),
        aspect=torch.tensor(aspects),
        render_height=optional_size("render_height"),
        render_width=optional_size("render_width"),
    )
