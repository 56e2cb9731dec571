"""Round bookkeeping of the progressive 3D update: schedule, planning, persistence, resume, sampling."""

import json
import math
import os

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from difix3d.core import progressive
from difix3d.core.poses import load_camera_path, make_pose, pose_distance, to_homogeneous
from difix3d.errors import Difix3DError
from difix3d.core.progressive import (
    ProgressiveConfig,
    ProgressiveUpdater,
    Targets,
    atomic_write_bytes,
    read_manifest,
    select_targets,
)

HEIGHT, WIDTH = 6, 8


def look_at_origin(centres: torch.Tensor) -> torch.Tensor:
    """OpenGL-style poses at `centres` [N, 3] looking at the origin (camera -z toward it)."""
    backward = torch.nn.functional.normalize(centres, dim=-1)
    right = torch.nn.functional.normalize(torch.linalg.cross(torch.tensor([0.0, 0.0, 1.0]).expand_as(backward), backward), dim=-1)
    up = torch.linalg.cross(backward, right)
    return make_pose(torch.stack([right, up, backward], dim=-1), centres)


def ring(count: int, radius: float, phase: float = 0.0, height: float = 0.5) -> torch.Tensor:
    angles = torch.arange(count) * 2 * math.pi / count + phase
    return look_at_origin(torch.stack([radius * angles.cos(), radius * angles.sin(), torch.full_like(angles, height)], -1))


TRAINING = ring(8, radius=3.0)
TARGETS = ring(3, radius=5.0, phase=0.4, height=1.5)


def make_updater(tmp_path, **overrides) -> ProgressiveUpdater:
    config = ProgressiveConfig(**{"fix_start": 100, "steps_per_fix": 100, **overrides})
    return ProgressiveUpdater(config, TRAINING, Targets(TARGETS, "eval"), tmp_path / "difix3d")


def run_round(updater: ProgressiveUpdater, step: int, seed: int = 0):
    """Plan a round and record it with random tiny images standing in for renders and Difix outputs."""
    plan = updater.plan_round(step)
    generator = torch.Generator().manual_seed(seed)
    count, num_refs = len(plan.poses), plan.reference_indices.shape[1]
    images = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    views = updater.record_round(
        plan,
        renders=images(count, HEIGHT, WIDTH, 3),
        accumulations=images(count, HEIGHT, WIDTH, 1),
        fixed_images=images(count, HEIGHT, WIDTH, 3),
        references=images(count, num_refs, HEIGHT, WIDTH, 3),
    )
    return plan, views


def assert_same_state(state_a, state_b):
    """Recursive equality; tensors must match exactly (values, dtype, shape)."""
    assert type(state_a) is type(state_b) or (isinstance(state_a, torch.Tensor) and isinstance(state_b, torch.Tensor))
    if isinstance(state_a, torch.Tensor):
        assert state_a.dtype == state_b.dtype and torch.equal(state_a, state_b)
    elif isinstance(state_a, dict):
        assert state_a.keys() == state_b.keys()
        for key in state_a:
            assert_same_state(state_a[key], state_b[key])
    elif isinstance(state_a, list):
        assert len(state_a) == len(state_b)
        for item_a, item_b in zip(state_a, state_b):
            assert_same_state(item_a, item_b)
    else:
        assert state_a == state_b


def temporary_files(root):
    return [path for path in root.rglob("*") if path.name.endswith(".tmp")]


# -- configuration and targets ------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [{"steps_per_fix": 0}, {"pose_step": 0.0}, {"num_refs": 0}, {"pseudo_view_prob": 1.5}, {"fix_start": -1},
     {"accumulation_threshold": 1.0}, {"pseudo_view_loss_weight": -0.1},
     {"pseudo_view_loss_downsample": 0}],
)
def test_config_rejects_bad_knobs(tmp_path, overrides):
    with pytest.raises(Difix3DError):
        make_updater(tmp_path, **overrides)


def test_updater_rejects_more_references_than_training_cameras(tmp_path):
    with pytest.raises(Difix3DError, match="num_refs"):
        make_updater(tmp_path, num_refs=9)


def test_defaults_follow_the_reference_release():
    config = ProgressiveConfig()
    assert (config.pose_step, config.num_refs, config.pseudo_view_prob) == (0.5, 1, 0.3)
    assert (config.pseudo_view_loss_weight, config.accumulation_threshold) == (0.3, 0.5)


def test_select_targets_prefers_eval_then_camera_path_then_trajectory(tmp_path):
    camera_path = tmp_path / "path.json"
    camera_path.write_text(json.dumps({"camera_path": [{"camera_to_world": to_homogeneous(TARGETS[0]).flatten().tolist(), "fov": 50}]}))

    from_eval = select_targets(TRAINING, TARGETS, camera_path)
    assert from_eval.source == "eval" and torch.equal(from_eval.poses, TARGETS)
    from_path = select_targets(TRAINING, TARGETS[:0], camera_path)
    assert from_path.source == "camera_path" and torch.equal(from_path.poses, load_camera_path(camera_path).poses)

    trajectory = select_targets(TRAINING)
    assert trajectory.source == "trajectory"
    assert trajectory.poses.shape == (len(TRAINING) - 1, 3, 4)
    # Midway targets: each is closer to the cameras it lies between than to any camera's own pose.
    assert (pose_distance(trajectory.poses, TRAINING[:-1]) > 0.1).all()
    assert torch.allclose(trajectory.poses[0, :, 3], (TRAINING[0, :, 3] + TRAINING[1, :, 3]) / 2, atol=0.2)
    with pytest.raises(Difix3DError):
        select_targets(TRAINING[:1])


# -- schedule and planning ----------------------------------------------------------------------


def test_rounds_fall_on_fix_start_plus_multiples_of_steps_per_fix(tmp_path):
    updater = make_updater(tmp_path, fix_start=10, steps_per_fix=7)
    steps = []
    for step in range(40):
        if updater.is_fix_step(step):
            run_round(updater, step)
            steps.append(step)
    assert steps == [10, 17, 24, 31, 38]
    assert updater.num_rounds == 5


def test_a_run_starting_between_fix_steps_catches_up_once(tmp_path):
    updater = make_updater(tmp_path, fix_start=10, steps_per_fix=7)
    steps = [step for step in range(20, 40) if updater.is_fix_step(step) and run_round(updater, step)]
    assert steps == [20, 24, 31, 38]


def test_first_round_starts_from_the_nearest_training_poses(tmp_path):
    updater = make_updater(tmp_path, num_refs=2)
    plan = updater.plan_round(100)
    expected_sources = torch.cdist(TARGETS[:, :, 3], TRAINING[:, :, 3]).argmin(dim=1)  # ring layout: nearest centre wins
    assert torch.equal(plan.source_indices, expected_sources)
    assert plan.reference_indices.shape == (3, 2)
    distances = torch.stack([pose_distance(pose, TRAINING) for pose in plan.poses])
    assert torch.equal(plan.reference_indices, distances.argsort(dim=1)[:, :2])
    moved = (plan.poses[:, :, 3] - TRAINING[plan.source_indices, :, 3]).norm(dim=-1)
    assert torch.allclose(moved, torch.full((3,), 0.5), atol=1e-5)
    assert not plan.snapped.any()
    # Planning changes nothing.
    assert updater.num_rounds == 0 and torch.equal(updater.current_poses, TRAINING)


def test_rounds_approach_the_targets_until_all_are_reached(tmp_path):
    updater = make_updater(tmp_path)
    mean_distances = []
    for round_index in range(20):
        plan, views = run_round(updater, 100 + 100 * round_index)
        assert [view.target_index for view in views] == [0, 1, 2]
        mean_distances.append(plan.distances.mean().item())
        if plan.snapped.all():
            break
    assert mean_distances[1] < mean_distances[0]
    assert all(later <= earlier for earlier, later in zip(mean_distances, mean_distances[1:]))
    assert plan.snapped.all() and torch.equal(updater.current_poses, TARGETS)
    # Later rounds start from the previous pseudo poses, not from the training cameras.
    assert len(updater.pseudo_views) == 3 * updater.num_rounds
    again = updater.plan_round(10_000)
    assert torch.equal(again.poses, TARGETS) and again.snapped.all()


def test_record_round_checks_its_inputs(tmp_path):
    updater = make_updater(tmp_path)
    plan = updater.plan_round(100)
    images = torch.rand(3, HEIGHT, WIDTH, 3)
    with pytest.raises(Difix3DError, match="renders"):
        updater.record_round(plan, images[:2], images[..., :1], images, images[:, None])
    with pytest.raises(Difix3DError, match="reference"):
        updater.record_round(plan, images, images[..., :1], images, torch.stack([images, images], 1))
    run_round(updater, 100)
    with pytest.raises(Difix3DError, match="planned"):
        updater.record_round(plan, images, images[..., :1], images, images[:, None])


# -- persistence --------------------------------------------------------------------------------


def test_round_files_and_manifest(tmp_path):
    updater = make_updater(tmp_path, num_refs=2)
    generator = torch.Generator().manual_seed(1)
    plan = updater.plan_round(100)
    fixed = torch.rand(3, HEIGHT, WIDTH, 3, generator=generator)
    accumulation = torch.rand(3, HEIGHT, WIDTH, 1, generator=generator)
    views = updater.record_round(plan, torch.rand(3, HEIGHT, WIDTH, 3), accumulation, fixed, torch.rand(3, 2, HEIGHT, WIDTH, 3))

    root = tmp_path / "difix3d"
    round_dir = root / "round_000"
    assert sorted(path.name for path in round_dir.iterdir()) == ["accumulation", "fixed", "mask", "reference", "render"]
    view = views[1]
    assert view.round_directory == round_dir
    for relative in (view.render_path, view.fixed_path, *view.reference_paths):
        assert iio.imread(round_dir / relative).shape == (HEIGHT, WIDTH, 3)
    saved_accumulation = iio.imread(round_dir / view.accumulation_path)
    assert saved_accumulation.dtype == np.uint16
    assert np.allclose(saved_accumulation / 65535, accumulation[1, ..., 0].numpy(), atol=1 / 65535)

    image, mask = updater.load_pseudo_view(1)
    assert image.shape == (HEIGHT, WIDTH, 3) and image.dtype == torch.float32
    assert torch.allclose(image, fixed[1], atol=0.5 / 255 + 1e-6)
    assert mask.shape == (HEIGHT, WIDTH, 1) and mask.dtype == torch.bool
    assert torch.equal(mask, accumulation[1] > 0.5)

    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["target_source"] == "eval" and len(manifest["rounds"]) == 1
    assert manifest["rounds"][0]["directory"] == "round_000"  # relative to the manifest's folder
    assert len(manifest["rounds"][0]["views"]) == 3
    assert manifest["rounds"][0]["views"][1]["reference_indices"] == plan.reference_indices[1].tolist()
    assert temporary_files(root) == []


def test_resume_from_a_checkpoint_restores_the_state_exactly(tmp_path):
    updater = make_updater(tmp_path, num_refs=2)
    for step in (100, 200):
        run_round(updater, step, seed=step)
    checkpoint = tmp_path / "step.ckpt"
    torch.save({"difix3d": updater.state_dict()}, checkpoint)

    # A resumed nerfstudio run writes to a new timestamped directory; old rounds stay where they are.
    resumed = ProgressiveUpdater(updater.config, TRAINING, Targets(TARGETS[:1], "eval"), tmp_path / "resumed")
    resumed.load_state_dict(torch.load(checkpoint, weights_only=True)["difix3d"])
    assert_same_state(resumed.state_dict(), updater.state_dict())
    assert [view.round_directory for view in resumed.pseudo_views] == [view.round_directory for view in updater.pseudo_views]
    for index in range(len(updater.pseudo_views)):
        for loaded, original in zip(resumed.load_pseudo_view(index), updater.load_pseudo_view(index)):
            assert torch.equal(loaded, original)
    assert not resumed.is_fix_step(299) and resumed.is_fix_step(300)
    next_plan, resumed_plan = updater.plan_round(300), resumed.plan_round(300)
    assert torch.equal(next_plan.poses, resumed_plan.poses)
    assert torch.equal(next_plan.reference_indices, resumed_plan.reference_indices)

    # The next round goes to the new directory; the manifest there lists every round.
    run_round(resumed, 300)
    assert resumed.pseudo_views[-1].round_directory == tmp_path / "resumed" / "round_002"
    assert len(read_manifest(tmp_path / "resumed")["rounds"]) == 3


def test_resume_from_the_manifest_of_a_moved_run(tmp_path):
    updater = make_updater(tmp_path)
    run_round(updater, 100)
    run_round(updater, 200)
    moved = tmp_path / "moved"
    (tmp_path / "difix3d").rename(moved)

    resumed = ProgressiveUpdater(updater.config, TRAINING, Targets(TARGETS, "eval"), moved)
    resumed.load_state_dict(read_manifest(moved))
    assert torch.equal(resumed.current_poses, updater.current_poses)
    assert [view.round_directory for view in resumed.pseudo_views] == [moved / "round_000"] * 3 + [moved / "round_001"] * 3
    for mine, theirs in zip(resumed.pseudo_views, updater.pseudo_views):
        assert torch.equal(mine.pose, theirs.pose)
        assert (mine.reference_indices, mine.distance, mine.fixed_path) == (theirs.reference_indices, theirs.distance, theirs.fixed_path)
    assert resumed.load_pseudo_view(4)[0].shape == (HEIGHT, WIDTH, 3)


def test_manifests_of_older_versions_with_absolute_directories_still_load(tmp_path):
    updater = make_updater(tmp_path)
    run_round(updater, 100)
    path = tmp_path / "difix3d" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["rounds"][0]["directory"] = str((tmp_path / "difix3d" / "round_000").absolute())
    path.write_text(json.dumps(manifest))
    resumed = ProgressiveUpdater(updater.config, TRAINING, Targets(TARGETS, "eval"), tmp_path / "difix3d")
    resumed.load_state_dict(read_manifest(tmp_path / "difix3d"))
    assert [view.round_directory for view in resumed.pseudo_views] == [tmp_path / "difix3d" / "round_000"] * 3


def test_resume_rejects_a_different_dataset_or_missing_files(tmp_path):
    updater = make_updater(tmp_path)
    run_round(updater, 100)
    state = updater.state_dict()
    other = ProgressiveUpdater(updater.config, TRAINING[:5], Targets(TARGETS, "eval"), tmp_path / "other")
    with pytest.raises(Difix3DError, match="training cameras"):
        other.load_state_dict(state)
    (tmp_path / "difix3d" / "round_000").rename(tmp_path / "elsewhere")
    with pytest.raises(Difix3DError, match="not found"):
        make_updater(tmp_path / "fresh").load_state_dict(state)
    with pytest.raises(Difix3DError, match="manifest"):
        read_manifest(tmp_path / "nowhere")


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "manifest.json"
    atomic_write_bytes(path, b"old")

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        atomic_write_bytes(path, b"new contents")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in path.parent.iterdir()) == ["manifest.json"]


def test_an_interrupted_round_leaves_the_last_complete_state(tmp_path, monkeypatch):
    updater = make_updater(tmp_path)
    run_round(updater, 100)
    manifest = (tmp_path / "difix3d" / "manifest.json").read_bytes()
    state = updater.state_dict()

    encode = iio.imwrite
    calls = []

    def crash_on_the_sixth_image(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:
            raise OSError("killed")
        return encode(*args, **kwargs)

    monkeypatch.setattr(progressive.iio, "imwrite", crash_on_the_sixth_image)
    with pytest.raises(OSError):
        run_round(updater, 200)
    assert (tmp_path / "difix3d" / "manifest.json").read_bytes() == manifest
    assert_same_state(updater.state_dict(), state)
    assert temporary_files(tmp_path) == []
    for path in (tmp_path / "difix3d").rglob("*.png"):
        iio.imread(path)  # every file that exists is a complete image


# -- sampling -----------------------------------------------------------------------------------


def test_choose_pseudo_view_is_seeded_and_follows_the_probability(tmp_path):
    updater = make_updater(tmp_path)
    generator = torch.Generator().manual_seed(0)
    assert updater.choose_pseudo_view(generator) is None  # nothing recorded yet
    run_round(updater, 100)

    def draws(seed, count=2000):
        generator = torch.Generator().manual_seed(seed)
        return [updater.choose_pseudo_view(generator) for _ in range(count)]

    first = draws(7)
    assert first == draws(7)
    chosen = [index for index in first if index is not None]
    assert abs(len(chosen) / len(first) - 0.3) < 0.04
    assert set(chosen) == {0, 1, 2}

    updater.config.pseudo_view_prob = 0.0
    assert set(draws(1, 50)) == {None}
    updater.config.pseudo_view_prob = 1.0
    assert None not in draws(1, 50)


def test_pseudo_views_come_from_the_latest_round_unless_all_are_asked_for(tmp_path):
    updater = make_updater(tmp_path, pseudo_view_prob=1.0)
    run_round(updater, 100)
    run_round(updater, 200, seed=1)
    generator = torch.Generator().manual_seed(3)
    latest = {updater.choose_pseudo_view(generator) for _ in range(200)}
    assert latest == {3, 4, 5} and {updater.pseudo_views[i].round_index for i in latest} == {1}
    updater.config.pseudo_view_rounds = "all"
    assert {updater.choose_pseudo_view(generator) for _ in range(200)} == set(range(6))
