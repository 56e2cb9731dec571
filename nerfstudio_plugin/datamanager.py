"""Full-image data plus the pseudo views of the progressive update.

`next_train` asks the library's `ProgressiveUpdater` whether this batch is a pseudo view (probability
`pseudo_view_prob`) and which one; a pseudo batch carries its fixed image, its accumulation mask and
its `loss_weight`, which the model turns into the weighted, masked loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple, Type

import torch
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.data.datamanagers.full_images_datamanager import FullImageDatamanager, FullImageDatamanagerConfig

from difix3d.progressive import ProgressiveUpdater


@dataclass
class Difix3DDatamanagerConfig(FullImageDatamanagerConfig):
    _target: Type = field(default_factory=lambda: Difix3DDatamanager)
    pseudo_view_seed: int = 0
    """Seed of the draw between training and pseudo views, so a run is repeatable."""


class Difix3DDatamanager(FullImageDatamanager):
    config: Difix3DDatamanagerConfig

    def __init__(self, config: Difix3DDatamanagerConfig, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        self.updater: Optional[ProgressiveUpdater] = None
        self._generator = torch.Generator().manual_seed(config.pseudo_view_seed)
        self._pseudo_batches: Dict[int, Tuple[Cameras, Dict]] = {}

    def attach(self, updater: ProgressiveUpdater) -> None:
        """Draw pseudo views from `updater` from now on."""
        self.updater = updater
        self._pseudo_batches.clear()

    def camera_at(self, pose: torch.Tensor, intrinsics_of: int) -> Cameras:
        """A one-camera `Cameras` at `pose` [3, 4] with the intrinsics of training camera `intrinsics_of`."""
        camera = self.train_dataset.cameras[intrinsics_of : intrinsics_of + 1]
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

    def next_train(self, step: int) -> Tuple[Cameras, Dict]:
        index = None if self.updater is None else self.updater.choose_pseudo_view(self._generator)
        if index is None:
            return super().next_train(step)
        if index not in self._pseudo_batches:
            view = self.updater.pseudo_views[index]
            image, mask = self.updater.load_pseudo_view(index)
            camera = self.camera_at(view.pose, view.reference_indices[0])
            batch = {"image": (image * 255).round().to(torch.uint8), "mask": mask.float()}
            batch["loss_weight"] = self.updater.config.pseudo_view_loss_weight
            self._pseudo_batches[index] = (camera, batch)
        camera, batch = self._pseudo_batches[index]
        return camera.to(self.device), {**batch, "image": batch["image"].to(self.device)}
