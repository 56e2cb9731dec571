"""Image-quality metrics: PSNR, SSIM and LPIPS on batched [B, 3, H, W] tensors in [0, 1].

Framework-free (torch, torchvision, lpips); shared by training, the nerfstudio method and the
benchmarks. LPIPS (v0.1: AlexNet, the paper's metric, or VGG-16) takes its ImageNet backbone weights
from `difix3d.imagenet_weights`, which never downloads; where they cannot be found LPIPS is reported
as unavailable (None), with the reason logged once.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from difix3d.errors import Difix3DError
from difix3d.imagenet_weights import Backbone, load_imagenet_features, missing_weights_message

logger = logging.getLogger(__name__)

PerceptualNet = Backbone


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


def build_lpips_network(net: PerceptualNet, features: dict[str, torch.Tensor] | None) -> torch.nn.Module:
    """An `lpips.LPIPS` model (frozen, eval mode) with its shipped linear layers (LPIPS v0.1).

    `features` is the state dict of torchvision's `features` trunk (`difix3d.imagenet_weights.
    load_imagenet_features`); None keeps the trunk random, which only the training loss may ask for
    explicitly (its values are not LPIPS).
    """
    import lpips

    with warnings.catch_warnings():
        # torchvision's deprecation warning for the `pretrained=False` that lpips passes.
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
    if features is not None:
        # lpips slices torchvision's `features` keeping its indices: net.slice2.5.weight is features.5.weight.
        model.net.load_state_dict({key: features[key.split(".", 1)[1]] for key in model.net.state_dict()})
    model.requires_grad_(False)
    return model.eval()


class LPIPSMetric:
    """LPIPS distance per image, or None when the backbone weights are absent (logged once).

    Usage: `metric = LPIPSMetric("alex"); metric(prediction, target)` with [B, 3, H, W] in [0, 1].
    """

    _warned: set[PerceptualNet] = set()

    def __init__(self, net: PerceptualNet = "alex", weights_path: str | Path | None = None, device: str | torch.device = "cpu"):
        self.net = net
        features = load_imagenet_features(net, weights_path)
        self.model = None if features is None else build_lpips_network(net, features).to(device)
        self.unavailable_reason = None if features is not None else missing_weights_message(net, weights_path)
        if self.model is None and net not in LPIPSMetric._warned:
            LPIPSMetric._warned.add(net)
            logger.warning("LPIPS unavailable: %s", self.unavailable_reason)

    @property
    def available(self) -> bool:
        return self.model is not None

    @torch.no_grad()
    def __call__(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
        if self.model is None:
            return None
        _check_pair(prediction, target)
        self.model.to(prediction.device)  # computed where the images are (a no-op after the first call)
        distance = self.model(prediction.float(), target.float().to(prediction.device), normalize=True)
        return distance.flatten()


SSIM_WINDOW = 11  # pixels: SSIM's Gaussian window; smaller images get NaN, not a number from padding


def image_scores(prediction: torch.Tensor, target: torch.Tensor, lpips: LPIPSMetric | None = None) -> dict[str, float]:
    """PSNR, SSIM and, when `lpips` has its weights, LPIPS of one image against its ground truth
    ([1, 3, H, W] in [0, 1]): how the Difix evaluations and the benchmarks score every image."""
    scores = {"psnr": float(psnr(prediction, target))}
    scores["ssim"] = float(ssim(prediction, target)) if min(prediction.shape[-2:]) >= SSIM_WINDOW else math.nan
    value = None if lpips is None else lpips(prediction, target)
    if value is not None:
        scores["lpips"] = float(value)
    return scores


def _check_pair(prediction: torch.Tensor, target: torch.Tensor) -> None:
    if prediction.shape != target.shape or prediction.dim() != 4:
        raise Difix3DError(
            f"metrics need two [B, C, H, W] tensors of the same shape, got {tuple(prediction.shape)} and {tuple(target.shape)}"
        )
