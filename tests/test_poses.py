"""Pose maths of the progressive update: distances, slerp, shifting with snapping, trajectories."""

import json
import math

import pytest
import torch

from difix3d.errors import Difix3DError
from difix3d.core.poses import (
    as_pose,
    interpolate_trajectory,
    load_camera_path,
    make_pose,
    matrix_to_quaternion,
    nearest_poses,
    pairwise_pose_distance,
    pose_distance,
    quaternion_slerp,
    quaternion_to_matrix,
    rotation_angle,
    shift_toward,
    to_homogeneous,
    translation_distance,
)



@pytest.fixture(autouse=True)
def double_precision():
    """Exact comparisons in float64; restored afterwards so other test modules keep float32."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def axis_angle(axis, angle) -> torch.Tensor:
    """Rotation matrix about `axis` by `angle` radians (Rodrigues)."""
    axis = torch.as_tensor(axis, dtype=torch.float64)
    axis = axis / axis.norm()
    skew = torch.tensor([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return torch.eye(3) + math.sin(angle) * skew + (1 - math.cos(angle)) * skew @ skew


def random_poses(count: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    rotation = torch.linalg.qr(torch.randn(count, 3, 3, generator=generator)).Q
    rotation = rotation * torch.linalg.det(rotation)[:, None, None]  # proper rotations
    return make_pose(rotation, torch.randn(count, 3, generator=generator) * 3)


def same_rotation(q_a: torch.Tensor, q_b: torch.Tensor, atol=1e-9) -> bool:
    return torch.allclose(quaternion_to_matrix(q_a), quaternion_to_matrix(q_b), atol=atol)


def test_as_pose_accepts_4x4_and_rejects_other_shapes():
    poses = random_poses(3)
    assert torch.equal(as_pose(to_homogeneous(poses)), poses)
    assert torch.equal(to_homogeneous(poses)[:, 3], torch.tensor([0.0, 0, 0, 1]).expand(3, 4))
    with pytest.raises(Difix3DError):
        as_pose(torch.zeros(3, 3))


def test_rotation_angle_and_combined_distance():
    base = make_pose(torch.eye(3), torch.zeros(3))
    for angle in (0.0, 1e-7, 0.3, math.pi / 2, math.pi - 1e-6, math.pi):
        turned = make_pose(axis_angle([1, 2, 3], angle), torch.tensor([3.0, 4.0, 0.0]))
        assert rotation_angle(base, turned).item() == pytest.approx(angle, abs=1e-9)
        assert pose_distance(base, turned).item() == pytest.approx(5 + angle, abs=1e-9)
    assert translation_distance(base, base).item() == 0


def test_distances_do_not_depend_on_camera_convention():
    poses_a, poses_b = random_poses(4, seed=1), random_poses(4, seed=2)
    opengl_to_opencv = torch.diag(torch.tensor([1.0, -1.0, -1.0]))
    flip = lambda poses: make_pose(poses[..., :3] @ opengl_to_opencv, poses[..., 3])  # noqa: E731
    assert torch.allclose(pose_distance(poses_a, poses_b), pose_distance(flip(poses_a), flip(poses_b)))


def test_pairwise_distance_and_nearest_poses():
    candidates = random_poses(6, seed=3)
    queries = candidates[[4, 1]].clone()
    queries[:, :, 3] += 0.01
    distances = pairwise_pose_distance(queries, candidates)
    assert distances.shape == (2, 6)
    assert torch.allclose(distances[1, 2], pose_distance(queries[1], candidates[2]))
    indices, nearest = nearest_poses(queries, candidates, k=3)
    assert indices[:, 0].tolist() == [4, 1]
    assert torch.equal(indices, distances.argsort(dim=1)[:, :3])
    assert (nearest[:, 1:] >= nearest[:, :-1]).all()
    with pytest.raises(Difix3DError):
        nearest_poses(queries, candidates, k=7)


def test_nearest_poses_breaks_ties_toward_the_lower_index():
    pose = random_poses(1)
    indices, _ = nearest_poses(pose, pose.expand(3, 3, 4), k=2)
    assert indices.tolist() == [[0, 1]]


def test_quaternion_round_trip_covers_every_branch():
    rotations = torch.stack(
        [torch.eye(3)]
        + [axis_angle(axis, math.pi) for axis in ([1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0])]
        + list(random_poses(20, seed=4)[:, :, :3])
    )
    quaternions = matrix_to_quaternion(rotations)
    assert torch.allclose(quaternions.norm(dim=-1), torch.ones(len(rotations)))
    assert (quaternions[:, 0] >= 0).all()
    assert torch.allclose(quaternion_to_matrix(quaternions), rotations, atol=1e-9)


def test_slerp_end_points_midpoint_and_antipodes():
    start = matrix_to_quaternion(axis_angle([0, 0, 1], 0.2))
    end = matrix_to_quaternion(axis_angle([0, 0, 1], 1.4))
    assert torch.allclose(quaternion_slerp(start, end, 0.0), start)
    assert torch.allclose(quaternion_slerp(start, end, 1.0), end)
    middle = quaternion_to_matrix(quaternion_slerp(start, end, 0.5))
    assert torch.allclose(middle, axis_angle([0, 0, 1], 0.8))

    # q and -q are one rotation: the shorter arc is no motion at all.
    for fraction in (0.0, 0.3, 1.0):
        assert same_rotation(quaternion_slerp(start, -start, fraction), start)
    # The other hemisphere: interpolating toward -end still takes the short way to `end`.
    assert torch.allclose(quaternion_to_matrix(quaternion_slerp(start, -end, 0.5)), axis_angle([0, 0, 1], 0.8))
    assert same_rotation(quaternion_slerp(start, -end, 1.0), end)
    # Rotations half a turn apart (orthogonal quaternions) are well defined too.
    half_turn = matrix_to_quaternion(axis_angle([0, 1, 0], math.pi))
    identity = torch.tensor([1.0, 0, 0, 0])
    assert torch.allclose(quaternion_to_matrix(quaternion_slerp(identity, half_turn, 0.5)), axis_angle([0, 1, 0], math.pi / 2))
    assert same_rotation(quaternion_slerp(identity, half_turn, 1.0), half_turn)
    # Nearly equal quaternions take the linear branch without dividing by ~0.
    near = matrix_to_quaternion(axis_angle([0, 0, 1], 0.2 + 1e-9))
    assert torch.isfinite(quaternion_slerp(start, near, 0.5)).all()


def test_slerp_broadcasts_fractions():
    start, end = matrix_to_quaternion(torch.eye(3)), matrix_to_quaternion(axis_angle([1, 0, 0], 1.0))
    fractions = torch.linspace(0, 1, 5)
    result = quaternion_slerp(start, end, fractions)
    angles = rotation_angle(make_pose(torch.eye(3), torch.zeros(3)), make_pose(quaternion_to_matrix(result), torch.zeros(5, 3)))
    assert torch.allclose(angles, fractions)


def test_shift_toward_moves_one_step_and_slerps_by_the_same_fraction():
    current = make_pose(torch.eye(3), torch.zeros(3))
    target = make_pose(axis_angle([0, 1, 0], 1.0), torch.tensor([4.0, 0, 0]))
    moved, snapped = shift_toward(current, target, 0.5)
    assert not snapped.item()
    assert torch.allclose(moved[:, 3], torch.tensor([0.5, 0, 0]))
    assert rotation_angle(current, moved).item() == pytest.approx(1.0 * 0.5 / 4)
    assert rotation_angle(moved, target).item() == pytest.approx(1.0 * 3.5 / 4)


def test_shift_toward_snaps_within_one_step():
    current = make_pose(torch.eye(3), torch.zeros(3))
    # Combined distance 0.3 + 0.1 <= 0.5: snaps exactly.
    near = make_pose(axis_angle([0, 0, 1], 0.1), torch.tensor([0.0, 0.3, 0]))
    # Translation 0.4 < step but combined 0.4 + 1.0 > step: the centre reaches the target, so does the rotation.
    turned = make_pose(axis_angle([0, 0, 1], 1.0), torch.tensor([0.0, 0.4, 0]))
    far = make_pose(torch.eye(3), torch.tensor([0.0, 0.0, 2.0]))
    targets = torch.stack([near, turned, far])
    moved, snapped = shift_toward(current, targets, 0.5)
    assert snapped.tolist() == [True, True, False]
    assert torch.equal(moved[:2], targets[:2])
    assert torch.allclose(moved[2, :, 3], torch.tensor([0.0, 0.0, 0.5]))
    with pytest.raises(Difix3DError):
        shift_toward(current, far, 0.0)


def test_shift_toward_jumps_the_last_translation_step_like_the_release():
    current = make_pose(torch.eye(3), torch.zeros(3))
    # 0.8 away, turned by 1 rad: one step of 0.5 would leave 0.3 <= 0.5, so the centre lands on the
    # target's; the rotation still slerps by 0.5 / 0.8.
    target = make_pose(axis_angle([0, 0, 1], 1.0), torch.tensor([0.8, 0, 0]))
    moved, snapped = shift_toward(current, target, 0.5)
    assert not snapped.item()
    assert torch.allclose(moved[:, 3], target[:, 3])
    assert rotation_angle(current, moved).item() == pytest.approx(0.5 / 0.8)
    exact, _ = shift_toward(current, target, 0.5, jump=False)
    assert torch.allclose(exact[:, 3], torch.tensor([0.5, 0, 0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_repeated_shifts_reach_the_target_monotonically(dtype):
    current = random_poses(5, seed=5).to(dtype)
    targets = random_poses(5, seed=6).to(dtype)
    distances = [pose_distance(current, targets)]
    for _ in range(100):
        current, snapped = shift_toward(current, targets, 0.5)
        distances.append(pose_distance(current, targets))
        if snapped.all():
            break
    assert snapped.all()
    assert torch.equal(current, targets)
    stacked = torch.stack(distances)
    assert (stacked[1:] <= stacked[:-1] + 1e-5).all()


def test_trajectory_passes_through_the_poses_with_orthonormal_rotations():
    keys = random_poses(4, seed=7)
    trajectory = interpolate_trajectory(keys, 3 * 3 + 1)
    assert trajectory.shape == (10, 3, 4)
    assert torch.allclose(trajectory[::3], keys, atol=1e-9)
    rotation = trajectory[:, :, :3]
    assert torch.allclose(rotation.transpose(1, 2) @ rotation, torch.eye(3).expand(10, 3, 3), atol=1e-9)
    assert torch.allclose(torch.linalg.det(rotation), torch.ones(10))
    # Smooth: consecutive samples are closer than the keys they lie between.
    steps = translation_distance(trajectory[1:], trajectory[:-1])
    assert steps.max() < translation_distance(keys[1:], keys[:-1]).max()


def test_trajectory_edge_cases():
    keys = random_poses(2, seed=8)
    line = interpolate_trajectory(keys, 5)
    assert torch.allclose(line[2, :, 3], keys[:, :, 3].mean(0))  # two keys: a straight line
    assert torch.equal(interpolate_trajectory(keys[:1], 3), keys[:1].expand(3, 3, 4))
    assert interpolate_trajectory(keys, 1).shape == (1, 3, 4)
    with pytest.raises(Difix3DError):
        interpolate_trajectory(keys, 0)


def test_load_camera_path(tmp_path):
    poses = random_poses(3, seed=9).float()
    path_json = {
        "camera_type": "perspective",
        "render_height": 48,
        "render_width": 64,
        "camera_path": [
            {"camera_to_world": to_homogeneous(pose).flatten().tolist(), "fov": 50.0 + i, "aspect": 4 / 3}
            for i, pose in enumerate(poses)
        ],
        "fps": 24,
        "seconds": 1,
    }
    path = tmp_path / "camera_path.json"
    path.write_text(json.dumps(path_json))
    camera_path = load_camera_path(path)
    assert torch.equal(camera_path.poses, poses)
    assert camera_path.vertical_fov_degrees.tolist() == [50.0, 51.0, 52.0]
    assert camera_path.aspect[0].item() == pytest.approx(4 / 3)
    assert (camera_path.render_height, camera_path.render_width) == (48, 64)


@pytest.mark.parametrize(
    "content",
    ["not json", json.dumps({"camera_path": []}), json.dumps({"camera_path": [{"fov": 50}]}),
     json.dumps({"camera_path": [{"camera_to_world": [0] * 12, "fov": 50}]})],
)
def test_load_camera_path_rejects_bad_files(tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(Difix3DError):
        load_camera_path(path)
    with pytest.raises(Difix3DError, match="not found"):
        load_camera_path(tmp_path / "missing.json")
