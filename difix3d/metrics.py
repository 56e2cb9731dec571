"""Image-quality metrics: PSNR, SSIM and LPIPS on batched [B, 3, H, W] tensors in [0, 1].

Framework-free (torch, torchvision, lpips); shared by training, the nerfstudio method and the
benchmarks. LPIPS needs ImageNet backbone weights that torchvision would download; this module never
downloads. It looks for them in a path given by the caller, in an environment variable
(`DIFIX3D_VGG16_WEIGHTS`, `DIFIX3D_ALEXNET_WEIGHTS`) and in the torch hub cache
(`torch.hub.get_dir()/checkpoints/`), and reports LPIPS as unavailable (None) when they are absent.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from difix3d.errors import Difix3DError

logger = logging.getLogger(__name__)

PerceptualNet = Literal["vgg", "alex"]

_WEIGHTS_ENV_VARS = {"vgg": "DIFIX3D_VGG16_WEIGHTS", "alex": "DIFIX3D_ALEXNET_WEIGHTS"}


def psnr(prediction: torch.Tensor, target: torch.Tensor, max_value: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, shape [B]; `inf` where the images are identical."""
    _check_pair(prediction, target)
    mse = (prediction.float() - target.float()).square().flatten(1).mean(dim=1)
    return 10.0 * torch.log10(max_value**2 / mse)  # mse == 0 gives +inf, not an error


def ssim(
    prediction: torch.Tensor,
    target: torch.Tensor,
    max_value: float = 1.0,
    window_size: int = 11,
    sigma: float = 1.5,
) -> torch.Tensor:
    """Structural similarity per image, shape [B] (Wang et al. 2004).

    Gaussian window (11, sigma 1.5), constants K1 = 0.01 and K2 = 0.03, statistics per channel over
    the windows that fit inside the image (no padding), averaged over windows and channels.
    """
    _check_pair(prediction, target)
    height, width = prediction.shape[-2:]
    if min(height, width) < window_size:
        raise Difix3DError(f"SSIM needs images of at least {window_size}x{window_size} pixels, got {height}x{width}")
    x, y = prediction.float(), target.float()
    channels = x.shape[1]
    coords = torch.arange(window_size, dtype=torch.float32, device=x.device) - (window_size - 1) / 2
    gauss = torch.exp(-coords.square() / (2 * sigma**2))
    gauss = gauss / gauss.sum()
    # The 2D Gaussian is separable: filter rows, then columns, one group per channel.
    kernel_h = gauss.view(1, 1, 1, -1).expand(channels, 1, 1, window_size)
    kernel_v = gauss.view(1, 1, -1, 1).expand(channels, 1, window_size, 1)

    def blur(image: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(image, kernel_h, groups=channels), kernel_v, groups=channels)

    c1, c2 = (0.01 * max_value) ** 2, (0.03 * max_value) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x.square()
    var_y = blur(y * y) - mu_y.square()
    cov_xy = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / (
        (mu_x.square() + mu_y.square() + c1) * (var_x + var_y + c2)
    )
    return ssim_map.flatten(1).mean(dim=1)


def backbone_weights_locations(net: PerceptualNet, weights_path: str | Path | None = None) -> list[Path]:
    """Where the ImageNet weights of `net` are looked for, in order (explicit path, env var, hub cache)."""
    locations = []
    if weights_path is not None:
        locations.append(Path(weights_path).expanduser())
    env_value = os.environ.get(_WEIGHTS_ENV_VARS[net])
    if env_value:
        locations.append(Path(env_value).expanduser())
    locations.append(Path(torch.hub.get_dir()) / "checkpoints" / _hub_file_name(net))
    return locations


def find_backbone_weights(net: PerceptualNet, weights_path: str | Path | None = None) -> Path | None:
    """The ImageNet weights file of `net` (torchvision's state dict), or None when none is present.

    A path the user named explicitly (argument or environment variable) that does not exist is an
    error, not a silent fall-through to the cache.
    """
    explicit = [Path(p).expanduser() for p in (weights_path, os.environ.get(_WEIGHTS_ENV_VARS[net])) if p]
    for path in explicit:
        if not path.is_file():
            raise Difix3DError(f"{_describe(net)} weights not found at {path}")
    for path in backbone_weights_locations(net, weights_path):
        if path.is_file():
            return path
    return None


def missing_backbone_message(net: PerceptualNet, weights_path: str | Path | None = None) -> str:
    """One line saying that `net`'s weights are missing, where they were looked for and how to provide them."""
    looked = ", ".join(str(p) for p in backbone_weights_locations(net, weights_path))
    return (
        f"{_describe(net)} ImageNet weights not found (looked in: {looked}); they are not downloaded. "
        f"Copy torchvision's {_hub_file_name(net)} into {Path(torch.hub.get_dir()) / 'checkpoints'} "
        f"or set {_WEIGHTS_ENV_VARS[net]} to its path"
    )


def build_lpips_network(net: PerceptualNet, backbone_weights: Path | None) -> torch.nn.Module:
    """An `lpips.LPIPS` model (frozen, eval mode) with its shipped linear layers.

    `backbone_weights` is a torchvision state dict file for the trunk; None keeps the trunk random,
    which only the training loss may ask for explicitly (its values are not LPIPS).
    """
    import lpips

    with warnings.catch_warnings():
        # torchvision's deprecation warning for the `pretrained=False` that lpips passes.
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
    if backbone_weights is not None:
        torchvision_state = torch.load(backbone_weights, map_location="cpu", weights_only=True)
        # lpips slices torchvision's `features` keeping its indices: net.slice2.5.weight is features.5.weight.
        trunk_state = {}
        for key in model.net.state_dict():
            source = "features." + key.split(".", 1)[1]
            if source not in torchvision_state:
                raise Difix3DError(f"{backbone_weights} is not a torchvision {_describe(net)} state dict (no {source})")
            trunk_state[key] = torchvision_state[source]
        model.net.load_state_dict(trunk_state)
    model.requires_grad_(False)
    return model.eval()


class LPIPSMetric:
    """LPIPS distance per image, or None when the backbone weights are absent (logged once).

    Usage: `metric = LPIPSMetric("alex"); metric(prediction, target)` with [B, 3, H, W] in [0, 1].
    """

    _warned: set[PerceptualNet] = set()

    def __init__(self, net: PerceptualNet = "alex", weights_path: str | Path | None = None, device: str | torch.device = "cpu"):
        self.net = net
        weights = find_backbone_weights(net, weights_path)
        self.model = None if weights is None else build_lpips_network(net, weights).to(device)
        if self.model is None and net not in LPIPSMetric._warned:
            LPIPSMetric._warned.add(net)
            logger.warning("LPIPS unavailable: %s", missing_backbone_message(net, weights_path))

    @property
    def available(self) -> bool:
        return self.model is not None

    @torch.no_grad()
    def __call__(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
        if self.model is None:
            return None
        _check_pair(prediction, target)
        device = next(self.model.parameters()).device
        distance = self.model(prediction.float().to(device), target.float().to(device), normalize=True)
        return distance.flatten()


def _hub_file_name(net: PerceptualNet) -> str:
    from torchvision.models import AlexNet_Weights, VGG16_Weights

    weights = VGG16_Weights.IMAGENET1K_V1 if net == "vgg" else AlexNet_Weights.IMAGENET1K_V1
    return weights.url.rsplit("/", 1)[-1]


def _describe(net: PerceptualNet) -> str:
    return {"vgg": "VGG-16", "alex": "AlexNet"}[net]


def _check_pair(prediction: torch.Tensor, target: torch.Tensor) -> None:
    if prediction.shape != target.shape or prediction.dim() != 4:
        raise Difix3DError(
            f"metrics need two [B, C, H, W] tensors of the same shape, got {tuple(prediction.shape)} and {tuple(target.shape)}"
        )
