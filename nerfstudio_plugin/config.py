"""The methods `difix3d-gs` (Splatfacto) and `difix3d-nerfacto` (Nerfacto), each with the progressive
Difix3D update and Difix3D+ renders.

Registered through the `nerfstudio.method_configs` entry points in pyproject.toml, so `ns-train --help`
lists them once the package is installed.

Each method is built when it is first asked for (the module's `__getattr__`), not at import, because
it copies nerfstudio's optimizer table from `nerfstudio.configs.method_configs`: ns-train imports this
module from inside that table's own import (plugin discovery comes after its built-in methods), and
importing the table at the top of this module would, when this module is imported first, start the
table, which would come back for this module's methods before they exist.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

from nerfstudio.cameras.camera_optimizers import CameraOptimizerConfig
from nerfstudio.configs.base_config import ViewerConfig
from nerfstudio.plugins.types import MethodSpecification

from difix3d.core.progressive import ProgressiveConfig
from nerfstudio_plugin.datamanager import Difix3DDatamanagerConfig, Difix3DRayDatamanagerConfig
from nerfstudio_plugin.dataparser import Difix3DColmapDataParserConfig
from nerfstudio_plugin.model import Difix3DGSModelConfig
from nerfstudio_plugin.nerfacto import Difix3DNerfactoModelConfig
from nerfstudio_plugin.pipeline import Difix3DNerfactoPipelineConfig, Difix3DPipelineConfig
from nerfstudio_plugin.trainer import Difix3DTrainerConfig

# The paper's schedule: a 3DGS reconstruction of 30k steps, then fine-tuning to 60k with a fix round
# every 2k steps. Starting from a stock splatfacto checkpoint (--load-checkpoint) skips the first half.
MAX_STEPS = 60_000


def upstream_optimizers(method: str, max_steps: Optional[int] = None) -> dict:
    """A copy of nerfstudio's own optimizer table for `method` (so its checkpoints' optimizer state loads
    here unchanged), with every learning-rate schedule stretched to `max_steps` when given."""
    from nerfstudio.configs.method_configs import method_configs  # built-in methods are complete by now

    optimizers = copy.deepcopy(method_configs[method].optimizers)
    for group in optimizers.values():
        if max_steps is not None and group["scheduler"] is not None:
            group["scheduler"].max_steps = max_steps
    return optimizers


def _difix3d_gs() -> MethodSpecification:
    return MethodSpecification(
        config=Difix3DTrainerConfig(
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
                    # *train* / *eval* split into training views and targets, others as nerfstudio splits them.
                    dataparser=Difix3DColmapDataParserConfig(colmap_path=Path("sparse/0"), load_3D_points=True),
                    cache_images_type="uint8",
                ),
                model=Difix3DGSModelConfig(),
            ),
            optimizers=upstream_optimizers("splatfacto", max_steps=MAX_STEPS),
            # Exit when training ends (nerfstudio's viewer would keep the process alive, forever on a headless machine).
            viewer=ViewerConfig(num_rays_per_chunk=1 << 15, quit_on_train_completion=True),
            vis="viewer",
        ),
        description="Difix3D+: 3DGS (Splatfacto) with progressive Difix pseudo-views and enhanced renders.",
    )


def _difix3d_nerfacto() -> MethodSpecification:
    return MethodSpecification(
        config=Difix3DTrainerConfig(
            method_name="difix3d-nerfacto",
            steps_per_eval_image=500,
            steps_per_eval_batch=500,
            steps_per_save=2000,
            steps_per_eval_all_images=5000,
            max_num_iterations=MAX_STEPS,
            mixed_precision=True,
            pipeline=Difix3DNerfactoPipelineConfig(
                datamanager=Difix3DRayDatamanagerConfig(
                    dataparser=Difix3DColmapDataParserConfig(colmap_path=Path("sparse/0")),
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
            optimizers=upstream_optimizers("nerfacto"),
            viewer=ViewerConfig(num_rays_per_chunk=1 << 15, quit_on_train_completion=True),
            vis="viewer",
        ),
        description="Difix3D+: NeRF (Nerfacto) with progressive Difix pseudo-views and enhanced renders.",
    )


_BUILDERS = {"difix3d_gs": _difix3d_gs, "difix3d_nerfacto": _difix3d_nerfacto}


def __getattr__(name: str) -> MethodSpecification:
    if name not in _BUILDERS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    spec = _BUILDERS[name]()
    # Building may have re-entered here through nerfstudio's plugin discovery: keep the first one.
    return globals().setdefault(name, spec)
