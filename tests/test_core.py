"""The framework-free Difix3D core driven by a fake host: rounds, references, enhancer, state."""

from __future__ import annotations

import io
import math

import pytest
import torch

from difix3d.core.fixer import Fixer
from difix3d.core.poses import make_pose, nearest_poses
from difix3d.core.progressive import ProgressiveConfig, Targets
from difix3d.core.steps import Difix3DUpdate, Enhancer, EnhancerConfig, downsample_for_loss
from difix3d.errors import Difix3DError

HEIGHT, WIDTH = 6, 8


def ring(count: int, radius: float, phase: float = 0.0, height: float = 0.5) -> torch.Tensor:
    angles = torch.arange(count) * 2 * math.pi / count + phase
    centres = torch.stack([radius * angles.cos(), radius * angles.sin(), torch.full_like(angles, height)], -1)
    backward = torch.nn.functional.normalize(centres, dim=-1)
    right = torch.nn.functional.normalize(torch.linalg.cross(torch.tensor([0.0, 0.0, 1.0]).expand_as(backward), backward), dim=-1)
    return make_pose(torch.stack([right, torch.linalg.cross(backward, right), backward], dim=-1), centres)


TRAINING = ring(8, radius=3.0)
TARGETS = ring(3, radius=5.0, phase=0.4, height=1.5)


class FakeHost:
    """Renders a flat grey whose level encodes the intrinsics camera; training image i is i / 10."""

    def __init__(self):
        self.render_calls = []

    def render(self, poses, intrinsics_of):
        self.render_calls.append((poses.clone(), intrinsics_of.clone()))
        rgb = (intrinsics_of.float() / 20)[:, None, None, None].expand(len(poses), HEIGHT, WIDTH, 3).clone()
        accumulation = torch.ones(len(poses), HEIGHT, WIDTH, 1)
        accumulation[:, :, : WIDTH // 2] = 0.2  # left half below the 0.5 threshold
        return rgb, accumulation

    def training_images(self, indices):
        return (indices.float() / 10)[:, None, None, None].expand(len(indices), HEIGHT, WIDTH, 3).clone()


class FakeFixer:
    """Outputs the mean of the first reference and the render; records what it was given."""

    def __init__(self):
        self.calls = []

    def __call__(self, images, references):
        self.calls.append((images.clone(), None if references is None else references.clone()))
        return (images + references[:, 0, :1, :1]) / 2  # one reference pixel: any render size works


def make_update(tmp_path, host=None, fixer=None, **overrides):
    config = ProgressiveConfig(**{"fix_start": 100, "steps_per_fix": 100, **overrides})
    host = host or FakeHost()
    return Difix3DUpdate(
        config, fixer or FakeFixer(), TRAINING, Targets(TARGETS, "eval"), tmp_path / "difix3d",
        host.render, host.training_images, seed=3,
    )


def run_steps(update, steps):
    """The host's loop: a fix round when due, then a draw; returns the rounds' steps and the draws."""
    rounds, draws = [], []
    for step in steps:
        plan = update.fix_round_if_due(step)
        if plan is not None:
            rounds.append(plan.step)
        pseudo = update.draw_pseudo_view()
        draws.append(None if pseudo is None else pseudo.index)
    return rounds, draws


def test_fake_fixer_satisfies_the_protocol():
    assert isinstance(FakeFixer(), Fixer)


def test_rounds_render_the_planned_poses_and_fix_with_nearest_references(tmp_path):
    host, fixer = FakeHost(), FakeFixer()
    update = make_update(tmp_path, host, fixer, num_refs=2)
    rounds, draws = run_steps(update, range(0, 250))
    assert rounds == [100, 200]
    assert all(draw is None for draw in draws[:100])  # no pseudo view before the first round
    assert update.updater.num_rounds == 2 and len(update.updater.pseudo_views) == 2 * len(TARGETS)

    poses, intrinsics_of = host.render_calls[0]
    expected_refs, _ = nearest_poses(poses, TRAINING, k=2)
    assert torch.equal(intrinsics_of, expected_refs[:, 0])  # rendered like the nearest training camera
    images, references = fixer.calls[0]
    assert references.shape == (len(TARGETS), 2, HEIGHT, WIDTH, 3)
    assert torch.allclose(references[:, :, 0, 0, 0], expected_refs.float() / 10)
    # The second round moved on from the first round's poses.
    assert not torch.equal(host.render_calls[1][0], poses)


def test_pseudo_views_carry_fixed_image_mask_and_weight(tmp_path):
    update = make_update(tmp_path, pseudo_view_prob=1.0, pseudo_view_loss_weight=0.3)
    update.fix_round_if_due(100)
    pseudo = update.draw_pseudo_view()
    view = update.updater.pseudo_views[pseudo.index]
    expected = (view.reference_indices[0] / 20 + view.reference_indices[0] / 10) / 2
    assert pseudo.image.dtype == torch.uint8 and pseudo.image.shape == (HEIGHT, WIDTH, 3)
    assert abs(pseudo.image.float().mean().item() / 255 - expected) < 1 / 255
    assert pseudo.mask.shape == (HEIGHT, WIDTH, 1)
    assert not pseudo.mask[:, : WIDTH // 2].any() and pseudo.mask[:, WIDTH // 2 :].all()
    assert pseudo.loss_weight == 0.3 and pseudo.intrinsics_of == view.reference_indices[0]
    assert pseudo.loss_downsample == 1  # the release compares pixel by pixel
    assert torch.equal(pseudo.pose, view.pose)
    update = make_update(tmp_path / "pooled", pseudo_view_prob=1.0, pseudo_view_loss_downsample=4)
    update.fix_round_if_due(100)
    assert update.draw_pseudo_view().loss_downsample == 4


def test_downsample_for_loss_averages_blocks_of_any_batch_shape():
    images = torch.rand(2, 5, 9, 13, 3)
    pooled = downsample_for_loss(images, 4)
    assert pooled.shape == (2, 5, 2, 3, 3)  # the last partial rows and columns are dropped
    torch.testing.assert_close(pooled[1, 2, 1, 2], images[1, 2, 4:8, 8:12].mean(dim=(0, 1)))
    assert downsample_for_loss(images, 1) is images


def test_renders_of_different_sizes_are_fixed_one_by_one(tmp_path):
    host = FakeHost()

    def render(poses, intrinsics_of):  # as lists, one image 2 pixels narrower
        rgb, accumulation = host.render(poses, intrinsics_of)
        return [rgb[0, :, 2:], *rgb[1:]], [accumulation[0, :, 2:], *accumulation[1:]]

    fixer = FakeFixer()
    update = Difix3DUpdate(
        ProgressiveConfig(fix_start=0), fixer, TRAINING, Targets(TARGETS, "eval"), tmp_path, render, host.training_images
    )
    assert update.fix_round_if_due(0) is not None
    assert len(fixer.calls) == len(TARGETS)


def test_state_restores_rounds_and_draws_exactly(tmp_path):
    uninterrupted = make_update(tmp_path / "a")
    expected = run_steps(uninterrupted, range(0, 330))

    first = make_update(tmp_path / "b")
    head = run_steps(first, range(0, 150))
    buffer = io.BytesIO()
    torch.save({"difix3d": first.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer)["difix3d"]  # weights_only: tensors and plain values only

    host, fixer = FakeHost(), FakeFixer()
    resumed = make_update(tmp_path / "b", host, fixer)
    resumed.load_state_dict(state)
    tail = run_steps(resumed, range(150, 330))
    assert head[0] + tail[0] == expected[0] == [100, 200, 300]
    assert head[1] + tail[1] == expected[1]
    assert torch.equal(resumed.updater.current_poses, uninterrupted.updater.current_poses)


def test_state_without_generator_keeps_the_seed(tmp_path):
    update = make_update(tmp_path)
    update.fix_round_if_due(100)
    state = update.state_dict()
    del state["pseudo_view_generator"]
    other = make_update(tmp_path)
    other.load_state_dict(state)
    assert other.updater.num_rounds == 1


def test_enhancer_has_its_own_number_of_references():
    host, fixer = FakeHost(), FakeFixer()
    enhancer = Enhancer(EnhancerConfig(num_refs=3), fixer, TRAINING, host.training_images)
    rgb = torch.full((HEIGHT, WIDTH, 3), 0.5)
    out = enhancer(rgb, TRAINING[5])
    references = fixer.calls[0][1]
    assert references.shape == (1, 3, HEIGHT, WIDTH, 3)
    assert references[0, 0, 0, 0, 0].item() == pytest.approx(0.5)  # the camera itself comes first
    assert out.shape == rgb.shape and torch.allclose(out, torch.full_like(rgb, 0.5))
    with pytest.raises(Difix3DError, match="num_refs"):
        Enhancer(EnhancerConfig(num_refs=9), fixer, TRAINING, host.training_images)
    with pytest.raises(Difix3DError, match="num_refs"):
        Enhancer(EnhancerConfig(num_refs=0), fixer, TRAINING, host.training_images)


def test_difix_fixer_runs_channels_last(tmp_path):
    from difix3d.core.fixer import DifixFixer
    from difix3d.models.difix import Difix

    fixer = DifixFixer(Difix.from_config("tiny"), offload=True)
    images, references = torch.rand(2, 16, 24, 3), torch.rand(2, 1, 16, 24, 3)
    fixed = fixer(images, references)
    assert fixed.shape == images.shape and fixed.min() >= 0 and fixed.max() <= 1
    assert fixer.difix.device.type == "cpu"


def test_enhancer_chooses_references_once_per_camera():
    host, fixer = FakeHost(), FakeFixer()
    loaded = []
    enhancer = Enhancer(EnhancerConfig(), fixer, TRAINING, lambda indices: loaded.append(indices) or host.training_images(indices))
    rgb = torch.full((HEIGHT, WIDTH, 3), 0.5)
    for pose in (TRAINING[5], TRAINING[5].clone(), TRAINING[2]):
        enhancer(rgb, pose)
    assert [indices.tolist() for indices in loaded] == [[5], [2]]  # the repeated camera reused its references
    assert len(fixer.calls) == 3
