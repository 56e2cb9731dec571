"""The Difix3D pipelines: load Difix before step 0, run the progressive update's fix rounds, and
enhance renders (Difix3D+), for Splatfacto (`difix3d-gs`) and Nerfacto (`difix3d-nerfacto`).

The Difix3D steps (which poses, which references, fixing, what is stored where, the pseudo-view
draw, the enhancer) are `difix3d.core.steps`; this module only supplies the nerfstudio model's renders and
the training images, and schedules the rounds as a training callback.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Type

import torch
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackAttributes, TrainingCallbackLocation
from nerfstudio.pipelines.base_pipeline import VanillaPipeline, VanillaPipelineConfig
from nerfstudio.utils.rich_utils import CONSOLE

from difix3d.core.fixer import DifixFixer
from difix3d.core.progressive import ProgressiveConfig, select_targets
from difix3d.core.steps import Difix3DUpdate, Enhancer, EnhancerConfig
from difix3d.devices import DtypeName, resolve_dtype
from difix3d.errors import Difix3DError
from difix3d.models.ids import DEFAULT_BASE, EMBEDDED_DIFIX
from nerfstudio_plugin.datamanager import (
    Difix3DDatamanager,
    Difix3DDatamanagerConfig,
    Difix3DRayDatamanager,
    Difix3DRayDatamanagerConfig,
)
from nerfstudio_plugin.model import Difix3DGSModel, Difix3DGSModelConfig
from nerfstudio_plugin.nerfacto import Difix3DNerfactoModel, Difix3DNerfactoModelConfig


@dataclass
class DifixSettings:
    """Which Difix fixes the pseudo views and the final renders, and where it runs."""

    model: str = "nvidia/difix_ref"
    """A hub id, a folder written by `difix3d` (save_pretrained), a reference-release `.pkl`, or
    `random-tiny-architecture` (a small Difix with random weights, for tests only)."""
    base: str = DEFAULT_BASE
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
    # A (frozen) instance default rather than a factory: a config.yml written before this option
    # existed still loads, the class attribute standing in for the missing field.
    enhancer: EnhancerConfig = EnhancerConfig()
    """Difix3D+: the final renders (`rgb_enhanced`) fixed by Difix."""


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
        config.enhancer.validate()
        _refuse_missing_enhanced_renders(config)
        super().__init__(config, device, *args, **kwargs)
        self.training_poses = self.datamanager.train_dataset.cameras.camera_to_worlds.float().cpu()
        if config.difix.enabled and config.progressive.num_refs > len(self.training_poses):
            raise Difix3DError(
                f"--pipeline.progressive.num-refs {config.progressive.num_refs} is more than the "
                f"{len(self.training_poses)} training images; give at most {len(self.training_poses)}"
            )
        self.update: Optional[Difix3DUpdate] = None
        self.trainer = None  # set when training starts (get_training_callbacks)
        self._saved_state: Optional[dict] = None
        # Loaded (and so checked) before step 0: a bad id fails in seconds, not after an hour.
        # Not an nn.Module attribute: Difix stays out of the 3D checkpoints and of `.to()`.
        self.fixer: Optional[DifixFixer] = self._load_fixer() if config.difix.enabled else None
        self.enhancer: Optional[Enhancer] = None
        if self.fixer is not None:
            self.enhancer = Enhancer(config.enhancer, self.fixer, self.training_poses, self.datamanager.training_images)
        self.model.set_enhancer(self.enhancer)

    def _load_fixer(self) -> DifixFixer:
        settings = self.config.difix
        device = torch.device(settings.device or self.device)
        dtype = resolve_dtype(settings.dtype, device)
        # Offloading saves memory for training between fix rounds; ns-viewer, ns-render and ns-eval
        # (test_mode "test"/"inference") keep Difix on the device rather than move it every frame.
        offload = settings.offload and self.test_mode == "val"
        # Imported here, not at the top: diffusers, peft and transformers add ~700 modules, and every
        # nerfstudio command pays for each loaded module when its method table is built (nerfstudio's
        # external-method stubs call inspect.stack(), which scans sys.modules per frame).
        from difix3d.models.checkpoint import load_difix

        try:
            difix = load_difix(settings.model, device="cpu" if offload else device, dtype=dtype, base=settings.base)
        except Difix3DError as error:
            hint = ""
            if device.type == "cpu":
                hint = f"; on a CPU, the embedded Difix needs no download: --pipeline.difix.model {EMBEDDED_DIFIX}"
            raise Difix3DError(f"--pipeline.difix.model {settings.model}: {error}{hint}") from None
        CONSOLE.log(f"Difix: {settings.model} on {device} ({dtype}){', offloaded between rounds' if offload else ''}")
        return DifixFixer(difix, device=device, offload=offload)

    def get_average_eval_image_metrics(self, *args: Any, **kwargs: Any):
        if len(self.datamanager.eval_dataset) == 0:
            raise Difix3DError(
                "this scene has no held-out (eval) images to score: ns-eval needs images whose names contain "
                "`eval` (e.g. `difix3d scene --num-eval 8`), or train with `colmap --eval-mode interval`"
            )
        return super().get_average_eval_image_metrics(*args, **kwargs)

    # -- the progressive update ----------------------------------------------------------------

    def get_training_callbacks(self, attributes: TrainingCallbackAttributes) -> List[TrainingCallback]:
        callbacks = super().get_training_callbacks(attributes)
        if self.fixer is None:
            return callbacks
        assert attributes.trainer is not None
        self.trainer = attributes.trainer
        self._start_update(attributes.trainer.base_dir / "difix3d")
        callbacks.append(TrainingCallback([TrainingCallbackLocation.BEFORE_TRAIN_ITERATION], self.fix_round_if_due))
        return callbacks

    def _start_update(self, output_dir) -> None:
        assert self.fixer is not None
        eval_cameras = self.datamanager.eval_dataset.cameras if len(self.datamanager.eval_dataset) else None
        targets = select_targets(
            self.training_poses,
            eval_poses=None if eval_cameras is None else eval_cameras.camera_to_worlds.float().cpu(),
            camera_path=self.config.progressive.target_camera_path,
        )
        CONSOLE.log(f"Difix3D targets: {len(targets.poses)} poses from {targets.source}"
                    + (" (no eval cameras or camera path: interpolated through the training cameras)" if targets.source == "trajectory" else ""))
        self.update = Difix3DUpdate(
            self.config.progressive,
            self.fixer,
            self.training_poses,
            targets,
            output_dir,
            render=self.render_poses,
            training_images=self.datamanager.training_images,
            seed=self.datamanager.config.pseudo_view_seed,
        )
        if self._saved_state is not None:
            self.update.load_state_dict(self._saved_state)
            self.update.updater.write_manifest()
            CONSOLE.log(f"Difix3D: resumed {self.update.updater.num_rounds} rounds, {len(self.update.updater.pseudo_views)} pseudo views")
        self.datamanager.attach(self.update)

    def render_camera(self, camera: Cameras) -> Dict[str, torch.Tensor]:
        """The model's outputs ("rgb", "accumulation") for one camera, without `rgb_enhanced`."""
        return self.model.get_outputs(camera)

    @torch.no_grad()
    def render_poses(self, poses: torch.Tensor, intrinsics_of: torch.Tensor) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """The core's render callable: RGB and accumulation of each pose with a training camera's intrinsics."""
        cameras = [self.datamanager.camera_at(pose, int(index)) for pose, index in zip(poses, intrinsics_of)]
        self.model.eval()
        try:
            outputs = [self.render_camera(camera.to(self.device)) for camera in cameras]
        finally:
            self.model.train()
        return [output["rgb"] for output in outputs], [output["accumulation"] for output in outputs]

    def fix_round_if_due(self, step: int) -> None:
        """A fix round when one is due (see `Difix3DUpdate.fix_round_if_due`), then a checkpoint."""
        assert self.update is not None
        plan = self.update.fix_round_if_due(step)
        if plan is None:
            return
        # A round costs one Difix pass per target: checkpoint now so a resumed run never repeats it.
        self.trainer.save_checkpoint(step)
        CONSOLE.log(self.update.round_summary(plan))

    # Resuming: the update's state travels in the pipeline checkpoint (tensors and plain values only,
    # so nerfstudio's `torch.load` reads it with weights_only=True); its images stay on disk.
    def get_extra_state(self) -> Dict[str, Any]:
        if self.update is not None:
            return self.update.state_dict()
        return self._saved_state or {}

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        self._saved_state = state if state.get("progressive") is not None else None
        if self.update is not None and self._saved_state is not None:
            self.update.load_state_dict(self._saved_state)
            self.datamanager.attach(self.update)


@dataclass
class Difix3DNerfactoPipelineConfig(Difix3DPipelineConfig):
    _target: Type = field(default_factory=lambda: Difix3DNerfactoPipeline)
    datamanager: Difix3DRayDatamanagerConfig = field(default_factory=Difix3DRayDatamanagerConfig)
    model: Difix3DNerfactoModelConfig = field(default_factory=Difix3DNerfactoModelConfig)


class Difix3DNerfactoPipeline(Difix3DPipeline):
    """The same Difix3D steps on Nerfacto: rounds render whole images from rays."""

    config: Difix3DNerfactoPipelineConfig
    datamanager: Difix3DRayDatamanager
    _model: Difix3DNerfactoModel

    def __init__(self, config: Difix3DNerfactoPipelineConfig, device: str, *args: Any, **kwargs: Any) -> None:
        if config.progressive.pseudo_view_loss_downsample != 1:
            raise Difix3DError(
                "difix3d-nerfacto trains on rays, not whole images, so it cannot pool a pseudo view: "
                "leave --pipeline.progressive.pseudo-view-loss-downsample at 1 (or use difix3d-gs)"
            )
        super().__init__(config, device, *args, **kwargs)

    def render_camera(self, camera: Cameras) -> Dict[str, torch.Tensor]:
        return self.model.get_outputs_for_camera_ray_bundle(camera.generate_rays(camera_indices=0, keep_shape=True))
