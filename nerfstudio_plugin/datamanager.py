"""Training data plus the pseudo views of the progressive update, for both nerfstudio hosts.

Each step, `next_train` asks the core (`difix3d.core.steps.Difix3DUpdate.draw_pseudo_view`) whether this
batch is a pseudo view (probability `pseudo_view_prob`) and which one.
- `Difix3DDatamanager` (full images, difix3d-gs): a pseudo batch carries its fixed image, its
  accumulation mask and its `loss_weight`, which the model turns into the weighted, masked loss.
- `Difix3DRayDatamanager` (ray batches, difix3d-nerfacto): a pseudo batch is a random set of rays
  of one pseudo view, drawn among its pixels inside the accumulation mask, with its `loss_weight`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple, Type

import torch
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.cameras.rays import RayBundle
from nerfstudio.data.datamanagers.base_datamanager import VanillaDataManager, VanillaDataManagerConfig
from nerfstudio.data.datamanagers.full_images_datamanager import FullImageDatamanager, FullImageDatamanagerConfig

from difix3d.core.steps import Difix3DUpdate
from difix3d.images import from_uint8


def camera_at(cameras: Cameras, pose: torch.Tensor, intrinsics_of: int) -> Cameras:
    """A one-camera `Cameras` at `pose` [3, 4] with the intrinsics of camera `intrinsics_of` of `cameras`."""
    camera = cameras[intrinsics_of : intrinsics_of + 1]
    return Cameras(
        camera_to_worlds=pose[None].to(camera.camera_to_worlds),
        fx=camera.fx,
        fy=camera.fy,
        cx=camera.cx,
        cy=camera.cy,
        width=camera.width,
        height=camera.height,
        distortion_params=camera.distortion_params,
        camera_type=camera.camera_type,
    )


@dataclass
class Difix3DDatamanagerConfig(FullImageDatamanagerConfig):
    _target: Type = field(default_factory=lambda: Difix3DDatamanager)
    pseudo_view_seed: int = 0
    """Seed of the draw between training and pseudo views, so a run is repeatable."""


class Difix3DDatamanager(FullImageDatamanager):
    config: Difix3DDatamanagerConfig

    def __init__(self, config: Difix3DDatamanagerConfig, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        self.update: Optional[Difix3DUpdate] = None
        self._pseudo_batches: Dict[int, Tuple[Cameras, Dict]] = {}

    def attach(self, update: Difix3DUpdate) -> None:
        """Draw pseudo views from `update` from now on."""
        self.update = update
        self._pseudo_batches.clear()

    def camera_at(self, pose: torch.Tensor, intrinsics_of: int) -> Cameras:
        """A one-camera `Cameras` at `pose` [3, 4] with the intrinsics of training camera `intrinsics_of`."""
        return camera_at(self.train_dataset.cameras, pose, intrinsics_of)

    def training_images(self, indices: torch.Tensor) -> torch.Tensor:
        """Training images [K, H, W, 3] (uint8 or float, as cached) for training-camera `indices` [K]."""
        return torch.stack([self.cached_train[int(i)]["image"][..., :3] for i in indices])

    def next_train(self, step: int) -> Tuple[Cameras, Dict]:
        pseudo = None if self.update is None else self.update.draw_pseudo_view()
        if pseudo is None:
            return super().next_train(step)
        if pseudo.index not in self._pseudo_batches:
            batch = {"image": pseudo.image, "mask": pseudo.mask.float(), "loss_weight": pseudo.loss_weight,
                     "loss_downsample": pseudo.loss_downsample}  # fmt: skip
            self._pseudo_batches[pseudo.index] = (self.camera_at(pseudo.pose, pseudo.intrinsics_of), batch)
        camera, batch = self._pseudo_batches[pseudo.index]
        return camera.to(self.device), {**batch, "image": batch["image"].to(self.device)}


@dataclass
class Difix3DRayDatamanagerConfig(VanillaDataManagerConfig):
    _target: Type = field(default_factory=lambda: Difix3DRayDatamanager)
    pseudo_view_seed: int = 0
    """Seed of the draw between training and pseudo views, so a run is repeatable."""


class Difix3DRayDatamanager(VanillaDataManager):
    config: Difix3DRayDatamanagerConfig

    def __init__(self, config: Difix3DRayDatamanagerConfig, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        self.update: Optional[Difix3DUpdate] = None
        self._ray_generator = torch.Generator().manual_seed(config.pseudo_view_seed)

    def attach(self, update: Difix3DUpdate) -> None:
        """Draw pseudo views from `update` from now on."""
        self.update = update

    def camera_at(self, pose: torch.Tensor, intrinsics_of: int) -> Cameras:
        """A one-camera `Cameras` at `pose` [3, 4] with the intrinsics of training camera `intrinsics_of`."""
        return camera_at(self.train_dataset.cameras, pose, intrinsics_of)

    def training_images(self, indices: torch.Tensor) -> torch.Tensor:
        """Training images [K, H, W, 3] in [0, 1] for training-camera `indices` [K] (read from disk)."""
        return torch.stack([self.train_dataset.get_image_float32(int(i))[..., :3] for i in indices])

    def next_train(self, step: int) -> Tuple[RayBundle, Dict]:
        pseudo = None if self.update is None else self.update.draw_pseudo_view()
        pixels = None if pseudo is None else pseudo.mask[..., 0].nonzero()
        if pseudo is None or len(pixels) == 0:  # a real batch (also when nothing rendered solid enough)
            return super().next_train(step)
        self.train_count += 1
        num_rays = self.config.train_num_rays_per_batch
        rows, columns = pixels[torch.randint(len(pixels), (num_rays,), generator=self._ray_generator)].unbind(-1)
        camera = self.camera_at(pseudo.pose, pseudo.intrinsics_of)
        rays = camera.generate_rays(
            camera_indices=torch.zeros(num_rays, 1, dtype=torch.long),
            coords=torch.stack([rows, columns], dim=-1).float() + 0.5,  # pixel centres, as nerfstudio's
        )
        # Appearance of the nearest training camera (the one whose intrinsics it was rendered with).
        rays.camera_indices = torch.full((num_rays, 1), pseudo.intrinsics_of, dtype=torch.long)
        batch = {
            "image": from_uint8(pseudo.image[rows, columns]),
            "indices": torch.stack([rays.camera_indices[:, 0], rows, columns], dim=-1),
            "loss_weight": pseudo.loss_weight,
        }
        return rays.to(self.device), batch
