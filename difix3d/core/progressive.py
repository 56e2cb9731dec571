"""Round bookkeeping of the progressive 3D update (Difix3D), free of any 3D framework.

Every `steps_per_fix` steps from `fix_start`, `ProgressiveUpdater.plan_round` makes one pseudo pose per
target: the nearest current pose (the training cameras in the first round, the previous round's
pseudo poses after that) moved `pose_step` toward the target, snapping onto it once within a step.
The caller renders those poses, fixes the renders with Difix and hands everything to `record_round`,
which writes the round's images and the manifest atomically under the updater's output directory.
Training then draws a pseudo view with `choose_pseudo_view` and loads its fixed image and mask with
`load_pseudo_view`. `state_dict` / `load_state_dict` (or `read_manifest`) restore a run exactly;
image data stays on disk, never in the state.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import imageio.v3 as iio
import numpy as np
import torch
from torch import Tensor

from difix3d.errors import Difix3DError
from difix3d.files import atomic_write_bytes
from difix3d.images import from_uint8, to_uint8
from difix3d.core.poses import (
    as_pose,
    interpolate_trajectory,
    load_camera_path,
    nearest_poses,
    pose_distance,
    shift_toward,
)

TargetSource = Literal["eval", "camera_path", "trajectory"]
MANIFEST_NAME = "manifest.json"
STATE_VERSION = 1


@dataclass
class ProgressiveConfig:
    """Knobs of the progressive 3D update; defaults follow the reference release (METHOD.md)."""

    fix_start: int = 30000
    """First step with a fix round (the release fine-tunes a 30k-step 3DGS reconstruction)."""
    steps_per_fix: int = 2000
    """Steps between fix rounds."""
    pose_step: float = 0.5
    """How far (scene units) each round moves a pseudo pose toward its target; within one step it snaps."""
    pose_jump: bool = True
    """The release's pose shift: a centre that one step would leave within one step of its target's
    jumps onto it (False: always exactly one step; see `difix3d.core.poses.shift_toward`)."""
    num_refs: int = 1
    """Reference views per pseudo view: the nearest training images by translation + rotation distance."""
    pseudo_view_prob: float = 0.3
    """Probability that a training batch draws a pseudo view instead of a training view."""
    pseudo_view_rounds: Literal["latest", "all"] = "latest"
    """Which pseudo views a batch draws from: the latest round's, as the release does, or every
    round's uniformly."""
    pseudo_view_loss_weight: float = 0.3
    """Weight of the photometric loss on a pseudo view."""
    pseudo_view_loss_downsample: int = 1
    """Compare a pseudo view with its render after average-pooling both by this factor. 1 is the
    release; > 1 takes only coarse colour from the fixed image and leaves fine detail to the
    training views (not in the release; `scripts/bench_quality.py --pseudo-view-loss-downsample`)."""
    accumulation_threshold: float = 0.5
    """Pseudo-view loss only counts pixels whose rendered accumulation (opacity) is above this."""
    target_camera_path: Optional[Path] = None
    """Nerfstudio camera-path JSON whose cameras are the targets, used when there are no eval cameras."""

    def validate(self, flag_prefix: str = "") -> None:
        """Raise `Difix3DError` naming the first knob outside its range; with `flag_prefix` (e.g.
        "--pipeline.progressive.") knobs are named as that command's flags."""

        def name(knob: str) -> str:
            return f"{flag_prefix}{knob.replace('_', '-')}" if flag_prefix else knob

        checks = [
            (self.fix_start >= 0, f"{name('fix_start')} must be >= 0, got {self.fix_start}"),
            (self.steps_per_fix >= 1, f"{name('steps_per_fix')} must be >= 1, got {self.steps_per_fix}"),
            (self.pose_step > 0, f"{name('pose_step')} must be > 0, got {self.pose_step}"),
            (self.num_refs >= 1, f"{name('num_refs')} must be >= 1, got {self.num_refs}"),
            (
                0 <= self.pseudo_view_prob <= 1,
                f"{name('pseudo_view_prob')} must be in [0, 1], got {self.pseudo_view_prob}",
            ),
            (
                self.pseudo_view_loss_weight >= 0,
                f"{name('pseudo_view_loss_weight')} must be >= 0, got {self.pseudo_view_loss_weight}",
            ),
            (
                self.pseudo_view_loss_downsample >= 1,
                f"{name('pseudo_view_loss_downsample')} must be >= 1, got {self.pseudo_view_loss_downsample}",
            ),
            (
                0 <= self.accumulation_threshold < 1,
                f"{name('accumulation_threshold')} must be in [0, 1), got {self.accumulation_threshold}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise Difix3DError(message)


@dataclass(frozen=True)
class Targets:
    """The poses the pseudo views travel toward, and where they came from."""

    poses: Tensor
    """[T, 3, 4] camera-to-world poses."""
    source: TargetSource
    """"eval" (eval cameras), "camera_path" (`target_camera_path`) or "trajectory" (through training cameras)."""


def select_targets(
    training_poses: Tensor, eval_poses: Optional[Tensor] = None, camera_path: Optional[Path] = None
) -> Targets:
    """Targets in order of preference: eval cameras, a camera-path JSON, else a trajectory through training.

    The trajectory targets lie midway (along a smooth spline, in the given order) between consecutive
    training cameras, so none coincides with a camera that already has a real image.
    """
    if eval_poses is not None and len(eval_poses) > 0:
        return Targets(as_pose(eval_poses).clone(), "eval")
    if camera_path is not None:
        return Targets(load_camera_path(camera_path).poses.to(training_poses), "camera_path")
    training_poses = as_pose(training_poses)
    if len(training_poses) < 2:
        raise Difix3DError("no eval cameras or camera path, and too few training cameras (< 2) to interpolate targets")
    trajectory = interpolate_trajectory(training_poses, 2 * len(training_poses) - 1)
    return Targets(trajectory[1::2].contiguous(), "trajectory")


@dataclass(frozen=True)
class RoundPlan:
    """The poses of one fix round, before rendering; one row per target."""

    round_index: int
    step: int
    poses: Tensor
    """[T, 3, 4] pseudo poses to render."""
    source_indices: Tensor
    """[T] index of the current pose each pseudo pose was moved from."""
    reference_indices: Tensor
    """[T, num_refs] nearest training poses, nearest first: the Difix reference views."""
    snapped: Tensor
    """[T] bool: the pseudo pose landed on its target."""
    distances: Tensor
    """[T] combined distance from each pseudo pose to its target."""


@dataclass(frozen=True, eq=False)
class PseudoView:
    """One recorded pseudo-training view. File paths are relative to `round_directory`."""

    round_index: int
    step: int
    target_index: int
    pose: Tensor
    """[3, 4] camera-to-world pose."""
    reference_indices: tuple[int, ...]
    snapped: bool
    distance: float
    """Combined distance to the target when recorded."""
    round_directory: Path
    render_path: str
    fixed_path: str
    accumulation_path: str
    mask_path: str
    reference_paths: tuple[str, ...]


@dataclass
class _Round:
    index: int
    step: int
    slot: int
    directory: Path
    views: list[PseudoView] = field(default_factory=list)


class ProgressiveUpdater:
    """Holds the targets, the current poses and the recorded pseudo views of a progressive update."""

    def __init__(
        self, config: ProgressiveConfig, training_poses: Tensor, targets: Targets, output_dir: str | Path
    ) -> None:
        """
        Args:
            config: the knobs; validated here.
            training_poses: [N, 3, 4] (or 4x4) poses of the training cameras, in the frame of the targets.
            targets: from `select_targets`.
            output_dir: where rounds and the manifest are written (e.g. `<run>/difix3d`).
        """
        config.validate()
        self.config = config
        self.training_poses = as_pose(training_poses).detach().clone()
        if self.training_poses.ndim != 3 or len(self.training_poses) == 0:
            raise Difix3DError(f"need [N, 3, 4] training poses with N >= 1, got {list(training_poses.shape)}")
        if config.num_refs > len(self.training_poses):
            raise Difix3DError(f"num_refs={config.num_refs} exceeds the {len(self.training_poses)} training cameras")
        self.target_poses = as_pose(targets.poses).detach().to(self.training_poses).clone()
        if self.target_poses.ndim != 3 or len(self.target_poses) == 0:
            raise Difix3DError("the progressive update needs at least one target pose")
        self.target_source: TargetSource = targets.source
        self.output_dir = Path(output_dir)
        self.current_poses = self.training_poses.clone()
        self._rounds: list[_Round] = []

    # -- schedule -----------------------------------------------------------------------------

    def _slot(self, step: int) -> int:
        return (step - self.config.fix_start) // self.config.steps_per_fix

    def is_fix_step(self, step: int) -> bool:
        """Whether a round is due: the step is at or past fix_start and no round ran yet in its period.

        Stepping one by one, rounds fall exactly on fix_start + k * steps_per_fix; a run that starts
        (or resumes) between those steps catches up with one round at its first step.
        """
        if step < self.config.fix_start:
            return False
        return not self._rounds or self._slot(step) > self._rounds[-1].slot

    # -- rounds -------------------------------------------------------------------------------

    def plan_round(self, step: int) -> RoundPlan:
        """The next round's pseudo poses, one per target; changes no state until `record_round`."""
        source_indices, _ = nearest_poses(self.target_poses, self.current_poses, k=1)
        source_indices = source_indices[:, 0]
        poses, snapped = shift_toward(
            self.current_poses[source_indices], self.target_poses, self.config.pose_step, jump=self.config.pose_jump
        )
        reference_indices, _ = nearest_poses(poses, self.training_poses, k=self.config.num_refs)
        return RoundPlan(
            round_index=len(self._rounds),
            step=step,
            poses=poses,
            source_indices=source_indices,
            reference_indices=reference_indices,
            snapped=snapped,
            distances=pose_distance(poses, self.target_poses),
        )

    def record_round(
        self,
        plan: RoundPlan,
        renders: Sequence[Tensor],
        accumulations: Sequence[Tensor],
        fixed_images: Sequence[Tensor],
        references: Sequence[Tensor],
    ) -> list[PseudoView]:
        """Write a planned round to disk, add its pseudo views and make its poses the current poses.

        Args:
            plan: the latest `plan_round` result.
            renders: per pseudo view, the render [H, W, 3] in [0, 1] (a stacked [T, H, W, 3] works).
            accumulations: per pseudo view, the accumulation [H, W, 1] or [H, W] in [0, 1].
            fixed_images: per pseudo view, the Difix output [H, W, 3] in [0, 1].
            references: per pseudo view, its reference images [num_refs, H', W', 3] in [0, 1].

        Images go to `<output_dir>/round_XXX/{render,fixed,accumulation,mask,reference}/`, then the
        manifest is rewritten; every file appears atomically, so an interrupted round leaves the last
        complete manifest in place.
        """
        if plan.round_index != len(self._rounds):
            raise Difix3DError(f"round {plan.round_index} was planned, but round {len(self._rounds)} is next")
        count = len(plan.poses)
        inputs = dict(renders=renders, accumulations=accumulations, fixed_images=fixed_images, references=references)
        for name, images in inputs.items():
            if len(images) != count:
                raise Difix3DError(f"record_round got {len(images)} {name} for {count} pseudo views")

        directory = self.output_dir / f"round_{plan.round_index:03d}"
        views = []
        for view in range(count):
            name = f"{view:03d}.png"
            accumulation = _as_hw1(accumulations[view], "accumulation")
            reference_images = references[view]
            if len(reference_images) != plan.reference_indices.shape[1]:
                raise Difix3DError(
                    f"pseudo view {view} has {len(reference_images)} reference images, "
                    f"expected {plan.reference_indices.shape[1]}"
                )
            files = {
                f"render/{name}": _to_uint8(renders[view]),
                f"fixed/{name}": _to_uint8(fixed_images[view]),
                # 16 bits keep the accumulation faithful; the mask is stored too so reloading is exact.
                f"accumulation/{name}": _to_uint16(accumulation[..., 0]),
                f"mask/{name}": _mask_to_uint8(accumulation[..., 0] > self.config.accumulation_threshold),
            }
            reference_paths = tuple(f"reference/{view:03d}_{slot}.png" for slot in range(len(reference_images)))
            files.update({path: _to_uint8(image) for path, image in zip(reference_paths, reference_images)})
            for relative_path, pixels in files.items():
                atomic_write_bytes(directory / relative_path, iio.imwrite("<bytes>", pixels, extension=".png"))
            views.append(
                PseudoView(
                    round_index=plan.round_index,
                    step=plan.step,
                    target_index=view,
                    pose=plan.poses[view].detach().clone(),
                    reference_indices=tuple(int(i) for i in plan.reference_indices[view]),
                    snapped=bool(plan.snapped[view]),
                    distance=float(plan.distances[view]),
                    round_directory=directory,
                    render_path=f"render/{name}",
                    fixed_path=f"fixed/{name}",
                    accumulation_path=f"accumulation/{name}",
                    mask_path=f"mask/{name}",
                    reference_paths=reference_paths,
                )
            )
        self._rounds.append(_Round(plan.round_index, plan.step, self._slot(plan.step), directory, views))
        self.current_poses = plan.poses.detach().clone()
        self.write_manifest()
        return views

    # -- training-time access -----------------------------------------------------------------

    @property
    def pseudo_views(self) -> list[PseudoView]:
        """All recorded pseudo views, oldest round first."""
        return [view for round_ in self._rounds for view in round_.views]

    @property
    def num_rounds(self) -> int:
        """Rounds recorded so far."""
        return len(self._rounds)

    def choose_pseudo_view(self, generator: torch.Generator) -> Optional[int]:
        """Index into `pseudo_views` for this batch, or None to train on a real view.

        Draws a pseudo view with probability `pseudo_view_prob`, uniformly among the latest round's
        views (or all recorded ones, by `pseudo_view_rounds`); draws nothing from `generator` while
        there are none, so the result is a function of its seed.
        """
        num_views = sum(len(round_.views) for round_ in self._rounds)
        if num_views == 0:
            return None
        if torch.rand((), generator=generator).item() >= self.config.pseudo_view_prob:
            return None
        # The latest round's views are the last ones of `pseudo_views`.
        first = num_views - len(self._rounds[-1].views) if self.config.pseudo_view_rounds == "latest" else 0
        return first + int(torch.randint(num_views - first, (), generator=generator))

    def load_pseudo_view(self, index: int) -> tuple[Tensor, Tensor]:
        """The fixed image [H, W, 3] (float32 in [0, 1]) and loss mask [H, W, 1] (bool) of a pseudo view."""
        view = self.pseudo_views[index]
        image = from_uint8(torch.from_numpy(iio.imread(view.round_directory / view.fixed_path)))
        mask = torch.from_numpy(iio.imread(view.round_directory / view.mask_path)) > 127
        return image[..., :3], mask.reshape(*mask.shape[:2], 1)

    # -- persistence --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The complete state as tensors and plain Python values (safe for `torch.load(weights_only=True)`)."""
        return {
            "version": STATE_VERSION,
            "target_source": self.target_source,
            "target_poses": self.target_poses.clone(),
            "num_training_poses": len(self.training_poses),
            "current_poses": self.current_poses.clone(),
            "rounds": [
                {
                    "index": round_.index,
                    "step": round_.step,
                    "slot": round_.slot,
                    "directory": str(round_.directory.absolute()),
                    "views": [_view_to_state(view) for view in round_.views],
                }
                for round_ in self._rounds
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore targets, current poses and pseudo views from `state_dict()` or `read_manifest()`.

        A round's images are looked for in the directory that wrote them, else in a directory of the
        same name under this updater's output directory (a moved run).
        """
        if state.get("version") != STATE_VERSION:
            raise Difix3DError(f"unsupported progressive-update state version {state.get('version')!r}")
        if state["num_training_poses"] != len(self.training_poses):
            raise Difix3DError(
                f"the saved progressive update had {state['num_training_poses']} training cameras, "
                f"this run has {len(self.training_poses)}; resume on the same dataset"
            )
        rounds = []
        for saved in state["rounds"]:
            directory = self._find_round_directory(Path(saved["directory"]))
            views = [_view_from_state(view, saved, directory, self.training_poses) for view in saved["views"]]
            rounds.append(_Round(saved["index"], saved["step"], saved["slot"], directory, views))
        self.target_source = state["target_source"]
        self.target_poses = torch.as_tensor(state["target_poses"]).to(self.training_poses).clone()
        self.current_poses = torch.as_tensor(state["current_poses"]).to(self.training_poses).clone()
        self._rounds = rounds

    def _find_round_directory(self, recorded: Path) -> Path:
        for candidate in (recorded, self.output_dir / recorded.name):
            if (candidate / "fixed").is_dir():
                return candidate
        raise Difix3DError(f"pseudo views of {recorded.name} not found in {recorded} or {self.output_dir}")

    def write_manifest(self) -> Path:
        """Write `state_dict()` as `<output_dir>/manifest.json` (atomically) and return its path.
        Round directories are recorded relative to the manifest's folder, so a moved run still reads."""
        path = self.output_dir / MANIFEST_NAME
        state = self.state_dict()
        for round_ in state["rounds"]:
            round_["directory"] = os.path.relpath(round_["directory"], self.output_dir.absolute())
        atomic_write_bytes(path, json.dumps(_to_json(state), indent=1).encode())
        return path


def read_manifest(output_dir: str | Path) -> dict[str, Any]:
    """The state saved in `<output_dir>/manifest.json`, ready for `ProgressiveUpdater.load_state_dict`."""
    path = Path(output_dir) / MANIFEST_NAME
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise Difix3DError(f"no progressive-update manifest at {path}") from None
    except (OSError, json.JSONDecodeError) as error:
        raise Difix3DError(f"cannot read {path}: {error}") from None
    for key in ("target_poses", "current_poses"):
        state[key] = torch.tensor(state[key], dtype=torch.float32)
    for round_ in state["rounds"]:
        # Relative to the manifest's folder (absolute in manifests of older versions).
        round_["directory"] = str(path.parent.absolute() / round_["directory"])
        for view in round_["views"]:
            view["pose"] = torch.tensor(view["pose"], dtype=torch.float32)
    return state


def _view_to_state(view: PseudoView) -> dict[str, Any]:
    return {
        "target_index": view.target_index,
        "pose": view.pose.clone(),
        "reference_indices": list(view.reference_indices),
        "snapped": view.snapped,
        "distance": view.distance,
        "render_path": view.render_path,
        "fixed_path": view.fixed_path,
        "accumulation_path": view.accumulation_path,
        "mask_path": view.mask_path,
        "reference_paths": list(view.reference_paths),
    }


def _view_from_state(state: dict[str, Any], round_: dict[str, Any], directory: Path, like: Tensor) -> PseudoView:
    return PseudoView(
        round_index=round_["index"],
        step=round_["step"],
        target_index=state["target_index"],
        pose=torch.as_tensor(state["pose"]).to(like).clone(),
        reference_indices=tuple(state["reference_indices"]),
        snapped=state["snapped"],
        distance=state["distance"],
        round_directory=directory,
        render_path=state["render_path"],
        fixed_path=state["fixed_path"],
        accumulation_path=state["accumulation_path"],
        mask_path=state["mask_path"],
        reference_paths=tuple(state["reference_paths"]),
    )


def _to_json(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {key: _to_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(item) for item in value]
    return value


def _as_hw1(image: Tensor, name: str) -> Tensor:
    image = image.detach()
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] != 1:
        raise Difix3DError(f"{name} must have shape [H, W] or [H, W, 1], got {list(image.shape)}")
    return image


def _to_uint8(image: Tensor) -> np.ndarray:
    image = image.detach()
    if image.ndim != 3 or image.shape[-1] != 3:
        raise Difix3DError(f"images must have shape [H, W, 3], got {list(image.shape)}")
    return to_uint8(image).cpu().numpy()


def _mask_to_uint8(mask: Tensor) -> np.ndarray:
    return mask.to(torch.uint8).mul(255).cpu().numpy()


def _to_uint16(image: Tensor) -> np.ndarray:
    return (image.float().clamp(0, 1) * 65535).round().cpu().numpy().astype(np.uint16)
