"""Nerfacto with the Difix3D steps: the model of `difix3d-nerfacto`.

Differences from nerfstudio's NerfactoModel, and why:
- pseudo-view ray batches carry a `loss_weight`, applied to the photometric loss (their rays are
  drawn inside the accumulation mask, so no mask is needed here);
- `get_outputs_for_camera` adds `rgb_enhanced` (Difix3D+, installed by the pipeline); ns-eval
  reports `psnr_enhanced`, `ssim_enhanced` (and `lpips_enhanced`) beside nerfacto's metrics;
- `populate_modules` sets up nerfacto's modules itself (nerfstudio 1.1.5), with
  `difix3d.metrics.LPIPSMetric("alex")` as LPIPS instead of torchmetrics' (which downloads AlexNet
  when it is built): the same LPIPS v0.1, with ImageNet weights from `difix3d.imagenet_weights`;
  where they are missing LPIPS is left out of the metrics, not reported as a number.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Tuple, Type

import numpy as np
import torch
from nerfstudio.field_components.spatial_distortions import SceneContraction
from nerfstudio.fields.density_fields import HashMLPDensityField
from nerfstudio.fields.nerfacto_field import NerfactoField
from nerfstudio.model_components.losses import MSELoss
from nerfstudio.model_components.ray_samplers import ProposalNetworkSampler, UniformSampler
from nerfstudio.model_components.renderers import AccumulationRenderer, DepthRenderer, NormalsRenderer, RGBRenderer
from nerfstudio.model_components.scene_colliders import NearFarCollider
from nerfstudio.model_components.shaders import NormalsShader
from nerfstudio.models.base_model import Model
from nerfstudio.models.nerfacto import NerfactoModel, NerfactoModelConfig
from nerfstudio.utils import colormaps

from difix3d.metrics import LPIPSMetric
from nerfstudio_plugin.enhanced_outputs import EnhancedRenders


@dataclass
class Difix3DNerfactoModelConfig(NerfactoModelConfig):
    """Nerfacto's options, plus Difix3D+ renders."""

    _target: Type = field(default_factory=lambda: Difix3DNerfactoModel)
    enhance_renders: bool = True
    """Add `rgb_enhanced` (Difix on the render) to renders outside training (ns-render, ns-eval, viewer)."""


class Difix3DNerfactoModel(EnhancedRenders, NerfactoModel):
    config: Difix3DNerfactoModelConfig

    def populate_modules(self) -> None:
        """Nerfacto's modules (nerfstudio 1.1.5), set up here because nerfacto's last step builds
        torchmetrics' LPIPS, which downloads AlexNet. Modules are built in nerfacto's order, so a seed
        draws the same initial weights and checkpoints keep nerfacto's keys."""
        Model.populate_modules(self)
        config = self.config
        contraction = None if config.disable_scene_contraction else SceneContraction(order=float("inf"))
        self.field = NerfactoField(
            self.scene_box.aabb, hidden_dim=config.hidden_dim, num_levels=config.num_levels, max_res=config.max_res,
            base_res=config.base_res, features_per_level=config.features_per_level,
            log2_hashmap_size=config.log2_hashmap_size, hidden_dim_color=config.hidden_dim_color,
            hidden_dim_transient=config.hidden_dim_transient, spatial_distortion=contraction,
            num_images=self.num_train_data, use_pred_normals=config.predict_normals,
            use_average_appearance_embedding=config.use_average_appearance_embedding,
            appearance_embedding_dim=config.appearance_embed_dim if config.use_appearance_embedding else 0,
            average_init_density=config.average_init_density, implementation=config.implementation,
        )  # fmt: skip
        self.camera_optimizer = config.camera_optimizer.setup(num_cameras=self.num_train_data, device="cpu")

        def proposal_network(arguments: dict) -> HashMLPDensityField:
            return HashMLPDensityField(
                self.scene_box.aabb, spatial_distortion=contraction, **arguments,
                average_init_density=config.average_init_density, implementation=config.implementation,
            )  # fmt: skip

        iterations, arguments = config.num_proposal_iterations, config.proposal_net_args_list
        if config.use_same_proposal_network:
            if len(arguments) != 1:
                raise ValueError("use_same_proposal_network takes exactly one entry in proposal_net_args_list")
            self.proposal_networks = torch.nn.ModuleList([proposal_network(arguments[0])])
            self.density_fns = [self.proposal_networks[0].density_fn] * iterations
        else:
            self.proposal_networks = torch.nn.ModuleList(
                proposal_network(arguments[min(i, len(arguments) - 1)]) for i in range(iterations)
            )
            self.density_fns = [network.density_fn for network in self.proposal_networks]

        def proposal_update_every(step: int) -> float:  # ramps up over the warm-up
            warmed = np.interp(step, [0, config.proposal_warmup], [0, config.proposal_update_every])
            return np.clip(warmed, 1, config.proposal_update_every)

        self.proposal_sampler = ProposalNetworkSampler(
            num_nerf_samples_per_ray=config.num_nerf_samples_per_ray,
            num_proposal_samples_per_ray=config.num_proposal_samples_per_ray,
            num_proposal_network_iterations=iterations, single_jitter=config.use_single_jitter,
            update_sched=proposal_update_every,
            initial_sampler=UniformSampler(single_jitter=config.use_single_jitter) if config.proposal_initial_sampler == "uniform" else None,
        )  # fmt: skip
        self.collider = NearFarCollider(near_plane=config.near_plane, far_plane=config.far_plane)
        self.renderer_rgb = RGBRenderer(background_color=config.background_color)
        self.renderer_accumulation = AccumulationRenderer()
        self.renderer_depth = DepthRenderer(method="median")
        self.renderer_expected_depth = DepthRenderer(method="expected")
        self.renderer_normals = NormalsRenderer()
        self.normals_shader = NormalsShader()
        self.rgb_loss = MSELoss()
        # Imported here, as nerfstudio does: at import time torchmetrics would add 2-3 s to every ns-* start.
        from torchmetrics.functional import structural_similarity_index_measure
        from torchmetrics.image import PeakSignalNoiseRatio

        self.psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.ssim = structural_similarity_index_measure
        # A plain attribute, not a submodule: its weights stay out of the checkpoints.
        self.lpips = LPIPSMetric("alex")
        self.step = 0

    def get_loss_dict(self, outputs, batch, metrics_dict=None) -> Dict[str, torch.Tensor]:
        loss_dict = super().get_loss_dict(outputs, batch, metrics_dict)
        if "loss_weight" in batch:  # pseudo views weigh less
            loss_dict["rgb_loss"] = loss_dict["rgb_loss"] * batch["loss_weight"]
        return loss_dict

    def get_image_metrics_and_images(
        self, outputs: Dict[str, torch.Tensor], batch: Dict[str, torch.Tensor]
    ) -> Tuple[Dict[str, float], Dict[str, torch.Tensor]]:
        gt_rgb = self.renderer_rgb.blend_background(batch["image"].to(self.device))
        metrics, images = self.render_metrics_and_images(outputs, gt_rgb)
        images["accumulation"] = colormaps.apply_colormap(outputs["accumulation"])
        images["depth"] = colormaps.apply_depth_colormap(outputs["depth"], accumulation=outputs["accumulation"])
        return metrics, images
