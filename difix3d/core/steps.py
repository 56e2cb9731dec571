"""Difix3D and Difix3D+ as steps a 3D host drives, free of any 3D framework.

A host (the nerfstudio methods, the plain gsplat trainer, your own loop) supplies two callables:

- `render(poses, intrinsics_of)`: camera-to-world poses [N, 3, 4] (in the host's own camera
  convention; pose distances and interpolation do not depend on it), each to be rendered with the
  intrinsics and image size of training camera `intrinsics_of[i]` -> (RGB [N, H, W, 3] in [0, 1],
  accumulation [N, H, W, 1] in [0, 1]); lists of [H, W, ...] tensors work too;
- `training_images(indices)`: training-camera indices [K] -> their images [K, H, W, 3], float in
  [0, 1] (uint8 is accepted too);

and a `Fixer` (`difix3d.core.fixer`). In the manner of gsplat's `Strategy`:

    update = Difix3DUpdate(ProgressiveConfig(), fixer, training_poses, targets, out_dir, render, images)
    for step in range(start, max_steps):
        update.fix_round_if_due(step)            # before the step: maybe a fix round
        pseudo = update.draw_pseudo_view()       # None: train on a real view this step
        ...                                       # loss on `pseudo.image` where `pseudo.mask`, x loss_weight
                                                  # (both pooled by `downsample_for_loss` when loss_downsample > 1)
    torch.save({"difix3d": update.state_dict(), ...})   # and update.load_state_dict(...) to resume

`Enhancer` is Difix3D+: a render fixed with the nearest training image(s) as references.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from difix3d.core.fixer import Fixer
from difix3d.core.poses import as_pose, nearest_poses
from difix3d.core.progressive import ProgressiveConfig, ProgressiveUpdater, RoundPlan, Targets
from difix3d.errors import Difix3DError
from difix3d.images import from_uint8, to_uint8

Images = Union[Tensor, Sequence[Tensor]]
RenderFn = Callable[[Tensor, Tensor], "tuple[Images, Images]"]
"""(poses [N, 3, 4], intrinsics_of [N]) -> (RGB [N, H, W, 3], accumulation [N, H, W, 1])."""
TrainingImagesFn = Callable[[Tensor], Tensor]
"""(training-camera indices [K]) -> images [K, H, W, 3] in [0, 1]."""


@dataclass(frozen=True)
class EnhancerConfig:
    """Knobs of Difix3D+ (the final renders fixed by Difix)."""

    num_refs: int = 1
    """Reference views per render: the nearest training images by translation + rotation distance."""

    def validate(self) -> None:
        if self.num_refs < 1:
            raise Difix3DError(f"enhancer num_refs must be >= 1, got {self.num_refs}")


@dataclass(frozen=True, eq=False)
class PseudoViewBatch:
    """A pseudo view drawn for one training step."""

    index: int
    """Index into `Difix3DUpdate.updater.pseudo_views`."""
    pose: Tensor
    """[3, 4] camera-to-world pose."""
    intrinsics_of: int
    """Training camera whose intrinsics and image size to render with (the nearest one)."""
    image: Tensor
    """[H, W, 3] uint8: the fixed render, the training target."""
    mask: Tensor
    """[H, W, 1] bool: pixels whose rendered accumulation was above the threshold; the loss counts only these."""
    loss_weight: float
    """Weight of this view's photometric loss."""
    loss_downsample: int = 1
    """Compare render and image after `downsample_for_loss` by this factor (1: pixel by pixel)."""


def downsample_for_loss(images: Tensor, factor: int) -> Tensor:
    """Images [..., H, W, C] average-pooled by `factor` in H and W (a last partial block is dropped).
    Apply the pseudo view's mask first, to render and fixed image alike."""
    if factor == 1:
        return images
    channels_first = images.movedim(-1, -3)
    pooled = torch.nn.functional.avg_pool2d(channels_first.reshape(-1, *channels_first.shape[-3:]), factor)
    return pooled.reshape(*channels_first.shape[:-2], *pooled.shape[-2:]).movedim(-3, -1)


def _to_float(images: Tensor) -> Tensor:
    return from_uint8(images) if images.dtype == torch.uint8 else images.float()


class Enhancer:
    """Difix3D+: fix a render with the nearest training image(s) as references."""

    def __init__(
        self, config: EnhancerConfig, fixer: Fixer, training_poses: Tensor, training_images: TrainingImagesFn
    ) -> None:
        config.validate()
        self.config = config
        self.fixer = fixer
        self.training_poses = as_pose(training_poses).detach().float().cpu()
        if config.num_refs > len(self.training_poses):
            raise Difix3DError(f"enhancer num_refs={config.num_refs} exceeds the {len(self.training_poses)} training cameras")
        self.training_images = training_images
        # The last poses' references, on the render device: a viewer re-renders one camera many
        # times (low-res, then settled; each training step), each time with the same references.
        self._last: Optional[tuple[Tensor, Tensor]] = None

    def references_for(self, camera_to_world: Tensor, device: torch.device) -> Tensor:
        """The reference images [B, R, H, W, 3] of poses [B, 3, 4] on `device` (the last poses' are kept)."""
        poses = as_pose(camera_to_world).detach().float().cpu()
        if self._last is not None and self._last[0].shape == poses.shape and torch.equal(self._last[0], poses) and self._last[1].device == device:
            return self._last[1]
        indices, _ = nearest_poses(poses, self.training_poses, k=self.config.num_refs)
        references = _to_float(self.training_images(indices.flatten())).unflatten(0, indices.shape).to(device)
        self._last = (poses, references)
        return references

    def enhance_batch(self, rgb: Tensor, camera_to_world: Tensor) -> Tensor:
        """Renders [B, H, W, 3] in [0, 1] at poses [B, 3, 4] -> enhanced renders [B, H, W, 3]."""
        return self.fixer(rgb, self.references_for(camera_to_world, rgb.device))

    def __call__(self, rgb: Tensor, camera_to_world: Tensor) -> Tensor:
        """One render [H, W, 3] at pose [3, 4] -> the enhanced render [H, W, 3]."""
        return self.enhance_batch(rgb[None], camera_to_world[None])[0]


class Difix3DUpdate:
    """The progressive 3D update: fix rounds at the scheduled steps, pseudo views drawn for training.

    Round bookkeeping (poses, references, files, manifest) is `ProgressiveUpdater` (`.updater`);
    this class renders through the host, fixes through the `Fixer`, and draws the pseudo views.
    """

    def __init__(
        self,
        config: ProgressiveConfig,
        fixer: Fixer,
        training_poses: Tensor,
        targets: Targets,
        output_dir: str | Path,
        render: RenderFn,
        training_images: TrainingImagesFn,
        seed: int = 0,
    ) -> None:
        """
        Args:
            config: the schedule and the pseudo-view knobs.
            fixer: fixes the rendered pseudo views.
            training_poses: [N, 3, 4] camera-to-world poses of the training cameras.
            targets: the poses pseudo views travel toward (`difix3d.core.progressive.select_targets`).
            output_dir: where rounds' images and the manifest are written.
            render, training_images: the host's callables (see the module docstring).
            seed: seed of the draw between real and pseudo views (its state is part of `state_dict`).
        """
        self.updater = ProgressiveUpdater(config, training_poses, targets, output_dir)
        self.config = self.updater.config
        self.fixer = fixer
        self.render = render
        self.training_images = training_images
        self.generator = torch.Generator().manual_seed(seed)
        self._loaded: dict[int, tuple[Tensor, Tensor]] = {}

    # -- step hooks ----------------------------------------------------------------------------

    @torch.no_grad()
    def fix_round_if_due(self, step: int) -> Optional[RoundPlan]:
        """Call before each training step. When a round is due: render the planned poses, fix them
        with their reference views, record them as pseudo views; returns the round's plan (else None).
        The host should checkpoint after a round: a resumed run then never repeats it."""
        if not self.updater.is_fix_step(step):
            return None
        plan = self.updater.plan_round(step)
        renders, accumulations = self.render(plan.poses, plan.reference_indices[:, 0])
        references = _to_float(self.training_images(plan.reference_indices.flatten()))
        references = references.unflatten(0, plan.reference_indices.shape)
        fixed = self._fix(renders, references)
        self.updater.record_round(plan, renders, accumulations, fixed, references)
        self._loaded.clear()
        return plan

    def _fix(self, renders: Images, references: Tensor) -> Images:
        if not isinstance(renders, Tensor) and len({render.shape for render in renders}) == 1:
            renders = torch.stack(list(renders))
        if isinstance(renders, Tensor):
            return self.fixer(renders, references.to(renders.device))
        # Renders of different sizes (cameras of different intrinsics): one call each.
        return [self.fixer(render[None], references[i : i + 1].to(render.device))[0] for i, render in enumerate(renders)]

    def draw_pseudo_view(self) -> Optional[PseudoViewBatch]:
        """Call once per training step: a pseudo view to train on (probability `pseudo_view_prob`
        once a round exists), or None for a real training view."""
        index = self.updater.choose_pseudo_view(self.generator)
        if index is None:
            return None
        if index not in self._loaded:
            image, mask = self.updater.load_pseudo_view(index)
            self._loaded[index] = (to_uint8(image), mask)
        image, mask = self._loaded[index]
        view = self.updater.pseudo_views[index]
        return PseudoViewBatch(
            index=index,
            pose=view.pose,
            intrinsics_of=view.reference_indices[0],
            image=image,
            mask=mask,
            loss_weight=self.config.pseudo_view_loss_weight,
            loss_downsample=self.config.pseudo_view_loss_downsample,
        )

    def round_summary(self, plan: RoundPlan) -> str:
        """One log line about a recorded round."""
        return (
            f"Difix3D round {plan.round_index} at step {plan.step}: {len(plan.poses)} pseudo views, "
            f"{int(plan.snapped.sum())} on target, mean distance to target {plan.distances.mean():.3f}"
        )

    # -- persistence ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Rounds, poses and the draw's random state, as tensors and plain values (images stay on disk)."""
        return {"progressive": self.updater.state_dict(), "pseudo_view_generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`; a state without the draw's random state (older runs) keeps the seed."""
        self.updater.load_state_dict(state["progressive"])
        if state.get("pseudo_view_generator") is not None:
            self.generator.set_state(torch.as_tensor(state["pseudo_view_generator"], dtype=torch.uint8))
        self._loaded.clear()
