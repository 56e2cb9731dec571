"""The Difix3D pipeline: loads Difix before step 0, runs the progressive update's fix rounds, and
enhances renders (Difix3D+).

The round logic (which poses, which references, what is stored where) is `difix3d.progressive`; this
module only renders with the nerfstudio model, feeds Difix, and hands the results back.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Type

import torch
from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackAttributes, TrainingCallbackLocation
from nerfstudio.pipelines.base_pipeline import VanillaPipeline, VanillaPipelineConfig
from nerfstudio.utils.rich_utils import CONSOLE

from difix3d.checkpoint import load_difix
from difix3d.devices import DtypeName, resolve_dtype
from difix3d.errors import Difix3DError
from difix3d.model import Difix
from difix3d.model_ids import EMBEDDED_DIFIX
from difix3d.poses import nearest_poses
from difix3d.progressive import ProgressiveConfig, ProgressiveUpdater, select_targets
from nerfstudio_plugin.datamanager import Difix3DDatamanager, Difix3DDatamanagerConfig
from nerfstudio_plugin.model import Difix3DGSModel, Difix3DGSModelConfig


@dataclass
class DifixSettings:
    """Which Difix fixes the pseudo views and the final renders, and where it runs."""

    model: str = "nvidia/difix_ref"
    """A hub id, a folder written by `difix3d` (save_pretrained), a reference-release `.pkl`, or
    `random-tiny-architecture` (a small Difix with random weights, for tests only)."""
    base: str = "stabilityai/sd-turbo"
    """The SD-Turbo (hub id or folder) a reference-release `.pkl` is applied on."""
    device: Optional[str] = None
    """Device for Difix; default: the pipeline's device."""
    dtype: DtypeName = "auto"
    """auto: bfloat16 on CUDA, float32 elsewhere."""
    offload: bool = False
    """Keep Difix on the CPU between fix rounds and move it to `device` only while it runs (saves GPU memory)."""
    enabled: bool = True
    """False trains plain 3DGS (Splatfacto): no pseudo views, no `rgb_enhanced`."""


@dataclass
class Difix3DPipelineConfig(VanillaPipelineConfig):
    _target: Type = field(default_factory=lambda: Difix3DPipeline)
    datamanager: Difix3DDatamanagerConfig = field(default_factory=Difix3DDatamanagerConfig)
    model: Difix3DGSModelConfig = field(default_factory=Difix3DGSModelConfig)
    difix: DifixSettings = field(default_factory=DifixSettings)
    """The Difix model."""
    progressive: ProgressiveConfig = field(default_factory=ProgressiveConfig)
    """The progressive 3D update (fix rounds, pseudo views)."""
    cpu_threads: int = 1
    """PyTorch threads when running on the CPU (0: PyTorch's default). Splatting small images is
    many small operations, where threads cost more than they give: on 2 cores, 200 steps at 160x120
    took 31 s with 1 thread and 120 s with 2 while another process was running."""


def _refuse_missing_enhanced_renders(config: Difix3DPipelineConfig) -> None:
    """ns-render asked for `rgb_enhanced` of a run without Difix: say so before anything is written
    (nerfstudio itself notices only after writing the first frame's other outputs)."""
    if config.difix.enabled or Path(sys.argv[0]).name != "ns-render" or "rgb_enhanced" not in sys.argv:
        return
    raise Difix3DError(
        "this run was trained with --pipeline.difix.enabled False, so it has no rgb_enhanced (Difix3D+) "
        "output: render rgb, or train with Difix enabled"
    )


class Difix3DPipeline(VanillaPipeline):
    config: Difix3DPipelineConfig
    datamanager: Difix3DDatamanager
    _model: Difix3DGSModel

    def __init__(self, config: Difix3DPipelineConfig, device: str, *args: Any, **kwargs: Any) -> None:
        config.progressive.validate(flag_prefix="--pipeline.progressive.")
        _refuse_missing_enhanced_renders(config)
        if torch.device(device).type == "cpu" and config.cpu_threads > 0:
            torch.set_num_threads(config.cpu_threads)
        super().__init__(config, device, *args, **kwargs)
        self.training_poses = self.datamanager.train_dataset.cameras.camera_to_worlds.float().cpu()
        if config.difix.enabled and config.progressive.num_refs > len(self.training_poses):
            raise Difix3DError(
                f"--pipeline.progressive.num-refs {config.progressive.num_refs} is more than the "
                f"{len(self.training_poses)} training images; give at most {len(self.training_poses)}"
            )
        self.updater: Optional[ProgressiveUpdater] = None
        self.trainer = None  # set when training starts (get_training_callbacks)
        self._saved_progress: Optional[dict] = None
        # Loaded (and so checked) before step 0: a bad id fails in seconds, not after an hour.
        # A plain attribute, not a submodule: Difix stays out of the 3DGS checkpoints and of `.to()`.
        self.__dict__["difix"] = self._load_difix() if config.difix.enabled else None
        self.model.set_enhancer(self.enhance if self.difix is not None else None)

    def _difix_device(self) -> torch.device:
        return torch.device(self.config.difix.device or self.device)

    def _load_difix(self) -> Difix:
        settings = self.config.difix
        device = self._difix_device()
        dtype = resolve_dtype(settings.dtype, device)
        try:
            difix = load_difix(settings.model, device="cpu" if settings.offload else device, dtype=dtype, base=settings.base)
        except Difix3DError as error:
            hint = ""
            if device.type == "cpu":
                hint = f"; on a CPU, the embedded tiny Difix needs no download: --pipeline.difix.model {EMBEDDED_DIFIX}"
            raise Difix3DError(f"--pipeline.difix.model {settings.model}: {error}{hint}") from None
        CONSOLE.log(f"Difix: {settings.model} on {device} ({dtype}){', offloaded between rounds' if settings.offload else ''}")
        return difix

    def get_average_eval_image_metrics(self, *args: Any, **kwargs: Any):
        if len(self.datamanager.eval_dataset) == 0:
            raise Difix3DError(
                "this scene has no held-out (eval) images to score: ns-eval needs images whose names contain "
                "`eval` (e.g. `difix3d scene --num-eval 8`), or train with `colmap --eval-mode interval`"
            )
        return super().get_average_eval_image_metrics(*args, **kwargs)

    # -- Difix ---------------------------------------------------------------------------------

    def reference_images(self, indices: torch.Tensor) -> torch.Tensor:
        """Training images [..., H, W, 3] in [0, 1] for training-camera `indices` [...]."""
        flat = [self.datamanager.cached_train[int(i)]["image"][..., :3] for i in indices.flatten()]
        images = torch.stack([image.float() / 255 if image.dtype == torch.uint8 else image.float() for image in flat])
        return images.unflatten(0, indices.shape)

    @torch.no_grad()
    def run_difix(self, images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        """Difix on images [B, H, W, 3] with references [B, R, H', W', 3] (channels last, as nerfstudio)."""
        assert self.difix is not None
        if self.config.difix.offload:
            self.difix.to(self._difix_device())
        try:
            refs = references.permute(0, 1, 4, 2, 3).to(images.device) if self.difix.config.reference_views else None
            fixed = self.difix.fix(images.permute(0, 3, 1, 2), refs)
        finally:
            if self.config.difix.offload:
                self.difix.to("cpu")
        return fixed.permute(0, 2, 3, 1)

    def enhance(self, rgb: torch.Tensor, camera_to_world: torch.Tensor) -> torch.Tensor:
        """Difix3D+: fix a render [H, W, 3] with the nearest training image(s) as references."""
        indices, _ = nearest_poses(camera_to_world[None].float().cpu(), self.training_poses, k=self.config.progressive.num_refs)
        return self.run_difix(rgb[None], self.reference_images(indices))[0]

    # -- the progressive update ----------------------------------------------------------------

    def get_training_callbacks(self, attributes: TrainingCallbackAttributes) -> List[TrainingCallback]:
        callbacks = super().get_training_callbacks(attributes)
        if self.difix is None:
            return callbacks
        assert attributes.trainer is not None
        self.trainer = attributes.trainer
        self._start_updater(attributes.trainer.base_dir / "difix3d")
        callbacks.append(TrainingCallback([TrainingCallbackLocation.BEFORE_TRAIN_ITERATION], self.fix_round_if_due))
        return callbacks

    def _start_updater(self, output_dir) -> None:
        eval_cameras = self.datamanager.eval_dataset.cameras if len(self.datamanager.eval_dataset) else None
        targets = select_targets(
            self.training_poses,
            eval_poses=None if eval_cameras is None else eval_cameras.camera_to_worlds.float().cpu(),
            camera_path=self.config.progressive.target_camera_path,
        )
        CONSOLE.log(f"Difix3D targets: {len(targets.poses)} poses from {targets.source}"
                    + (" (no eval cameras or camera path: interpolated through the training cameras)" if targets.source == "trajectory" else ""))
        self.updater = ProgressiveUpdater(self.config.progressive, self.training_poses, targets, output_dir)
        if self._saved_progress is not None:
            self.updater.load_state_dict(self._saved_progress)
            self.updater.write_manifest()
            CONSOLE.log(f"Difix3D: resumed {self.updater.num_rounds} rounds, {len(self.updater.pseudo_views)} pseudo views")
        self.datamanager.attach(self.updater)

    @torch.no_grad()
    def fix_round_if_due(self, step: int) -> None:
        """One round: render the planned poses, fix them with Difix, add them as pseudo views."""
        assert self.updater is not None
        if not self.updater.is_fix_step(step):
            return
        plan = self.updater.plan_round(step)
        cameras = [self.datamanager.camera_at(pose, int(refs[0])) for pose, refs in zip(plan.poses, plan.reference_indices)]
        self.model.eval()
        try:
            outputs = [self.model.get_outputs(camera.to(self.device)) for camera in cameras]
        finally:
            self.model.train()
        renders = torch.stack([output["rgb"] for output in outputs])
        accumulations = torch.stack([output["accumulation"] for output in outputs])
        references = self.reference_images(plan.reference_indices)
        fixed = self.run_difix(renders, references.to(renders.device))
        self.updater.record_round(plan, renders, accumulations, fixed, references)
        # A round costs one Difix pass per target: checkpoint now so a resumed run never repeats it.
        self.trainer.save_checkpoint(step)
        CONSOLE.log(
            f"Difix3D round {plan.round_index} at step {step}: {len(plan.poses)} pseudo views, "
            f"{int(plan.snapped.sum())} on target, mean distance to target {plan.distances.mean():.3f}"
        )

    # Resuming: the update's state travels in the pipeline checkpoint (tensors and plain values only,
    # so nerfstudio's `torch.load` reads it with weights_only=True); its images stay on disk.
    def get_extra_state(self) -> Dict[str, Any]:
        if self.updater is not None:
            return {"progressive": self.updater.state_dict()}
        return {"progressive": self._saved_progress} if self._saved_progress is not None else {}

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        self._saved_progress = state.get("progressive")
        if self.updater is not None and self._saved_progress is not None:
            self.updater.load_state_dict(self._saved_progress)
            self.datamanager.attach(self.updater)
