"""The methods `difix3d-gs` (Splatfacto) and `difix3d-nerfacto` (Nerfacto), each with the progressive
Difix3D update and Difix3D+ renders.

Registered through the `nerfstudio.method_configs` entry points in pyproject.toml, so `ns-train --help`
lists them once the package is installed.
"""

from __future__ import annotations

from pathlib import Path

from nerfstudio.cameras.camera_optimizers import CameraOptimizerConfig
from nerfstudio.configs.base_config import ViewerConfig
from nerfstudio.data.dataparsers.colmap_dataparser import ColmapDataParserConfig
from nerfstudio.engine.optimizers import AdamOptimizerConfig
from nerfstudio.engine.schedulers import ExponentialDecaySchedulerConfig
from nerfstudio.engine.trainer import TrainerConfig
from nerfstudio.plugins.types import MethodSpecification

from difix3d.progressive import ProgressiveConfig
from nerfstudio_plugin.datamanager import Difix3DDatamanagerConfig, Difix3DRayDatamanagerConfig
from nerfstudio_plugin.model import Difix3DGSModelConfig
from nerfstudio_plugin.nerfacto import Difix3DNerfactoModelConfig
from nerfstudio_plugin.pipeline import Difix3DNerfactoPipelineConfig, Difix3DPipelineConfig

# The paper's schedule: a 3DGS reconstruction of 30k steps, then fine-tuning to 60k with a fix round
# every 2k steps. Starting from a stock splatfacto checkpoint (--load-checkpoint) skips the first half.
MAX_STEPS = 60_000


def splatfacto_optimizers(max_steps: int = MAX_STEPS) -> dict:
    """Splatfacto's per-parameter optimizers (nerfstudio 1.1.5 values), so a splatfacto checkpoint's
    optimizer state loads into this method unchanged."""

    def adam(lr: float) -> AdamOptimizerConfig:
        return AdamOptimizerConfig(lr=lr, eps=1e-15)

    return {
        "means": {
            "optimizer": adam(1.6e-4),
            "scheduler": ExponentialDecaySchedulerConfig(lr_final=1.6e-6, max_steps=max_steps),
        },
        "features_dc": {"optimizer": adam(0.0025), "scheduler": None},
        "features_rest": {"optimizer": adam(0.0025 / 20), "scheduler": None},
        "opacities": {"optimizer": adam(0.05), "scheduler": None},
        "scales": {"optimizer": adam(0.005), "scheduler": None},
        "quats": {"optimizer": adam(0.001), "scheduler": None},
        "camera_opt": {
            "optimizer": adam(1e-4),
            "scheduler": ExponentialDecaySchedulerConfig(
                lr_final=5e-7, max_steps=max_steps, warmup_steps=1000, lr_pre_warmup=0
            ),
        },
    }


difix3d_gs = MethodSpecification(
    config=TrainerConfig(
        method_name="difix3d-gs",
        steps_per_eval_image=500,
        steps_per_eval_batch=0,
        steps_per_save=2000,
        steps_per_eval_all_images=5000,
        max_num_iterations=MAX_STEPS,
        mixed_precision=False,
        pipeline=Difix3DPipelineConfig(
            datamanager=Difix3DDatamanagerConfig(
                # COLMAP scenes as `difix3d scene` and COLMAP itself write them; frames named
                # *train* / *eval* split into training views and targets.
                dataparser=ColmapDataParserConfig(
                    colmap_path=Path("sparse/0"), eval_mode="filename", load_3D_points=True
                ),
                cache_images_type="uint8",
            ),
            model=Difix3DGSModelConfig(),
        ),
        optimizers=splatfacto_optimizers(),
        viewer=ViewerConfig(num_rays_per_chunk=1 << 15),
        vis="viewer",
    ),
    description="Difix3D+: 3DGS (Splatfacto) with progressive Difix pseudo-views and enhanced renders.",
)


def nerfacto_optimizers() -> dict:
    """Nerfacto's optimizers (nerfstudio 1.1.5 values), so a nerfacto checkpoint's optimizer state
    loads into this method unchanged."""
    return {
        "proposal_networks": {
            "optimizer": AdamOptimizerConfig(lr=1e-2, eps=1e-15),
            "scheduler": ExponentialDecaySchedulerConfig(lr_final=0.0001, max_steps=200000),
        },
        "fields": {
            "optimizer": AdamOptimizerConfig(lr=1e-2, eps=1e-15),
            "scheduler": ExponentialDecaySchedulerConfig(lr_final=0.0001, max_steps=200000),
        },
        "camera_opt": {
            "optimizer": AdamOptimizerConfig(lr=1e-3, eps=1e-15),
            "scheduler": ExponentialDecaySchedulerConfig(lr_final=1e-4, max_steps=5000),
        },
    }


difix3d_nerfacto = MethodSpecification(
    config=TrainerConfig(
        method_name="difix3d-nerfacto",
        steps_per_eval_image=500,
        steps_per_eval_batch=500,
        steps_per_save=2000,
        steps_per_eval_all_images=5000,
        max_num_iterations=MAX_STEPS,
        mixed_precision=True,
        pipeline=Difix3DNerfactoPipelineConfig(
            datamanager=Difix3DRayDatamanagerConfig(
                dataparser=ColmapDataParserConfig(colmap_path=Path("sparse/0"), eval_mode="filename"),
                train_num_rays_per_batch=4096,
                eval_num_rays_per_batch=4096,
            ),
            model=Difix3DNerfactoModelConfig(
                eval_num_rays_per_chunk=1 << 15,
                average_init_density=0.01,
                camera_optimizer=CameraOptimizerConfig(mode="SO3xR3"),
            ),
            # The reference release's NeRF method draws a pseudo view for 40% of the batches.
            progressive=ProgressiveConfig(pseudo_view_prob=0.4),
        ),
        optimizers=nerfacto_optimizers(),
        viewer=ViewerConfig(num_rays_per_chunk=1 << 15),
        vis="viewer",
    ),
    description="Difix3D+: NeRF (Nerfacto) with progressive Difix pseudo-views and enhanced renders.",
)
