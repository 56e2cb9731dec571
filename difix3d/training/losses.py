"""Difix training loss: L2 + LPIPS (VGG) + Gram (style) loss on VGG-16 features.

One frozen VGG-16 trunk (lpips's slices of torchvision's VGG-16, cut at relu1_2, relu2_2, relu3_3,
relu4_3 and relu5_3) runs once per image and feeds both LPIPS and the Gram loss. Its ImageNet
weights come from `difix3d.imagenet_weights` (never downloaded here); when absent the loss refuses to
build unless the caller asks for a random trunk explicitly (`perceptual_backbone="random"`, for tests
and smoke runs), which is logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence, get_args

import torch
import torch.nn.functional as F
from torch import nn

from difix3d.errors import Difix3DError
from difix3d.imagenet_weights import find_imagenet_weights, load_imagenet_features, missing_weights_message
from difix3d.metrics import build_lpips_network

logger = logging.getLogger(__name__)

PerceptualBackbone = Literal["pretrained", "random"]
L2Form = Literal["mse", "log-mse"]

# Added to each image's MSE (on [-1, 1]) before its log: no pair is worth more than a 66 dB one.
LOG_MSE_FLOOR = 1e-6

# Per-layer weights of the Gram loss for relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (METHOD.md).
GRAM_LAYER_WEIGHTS = (1 / 2.6, 1 / 4.8, 1 / 3.7, 1 / 5.6, 10 / 1.5)

# Seed of the random trunk, fixed so that a resumed run sees the same features as the first one.
_RANDOM_BACKBONE_SEED = 0


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """Gram matrix of [B, C, H, W] features, normalised by C*H*W (Johnson et al. 2016): [B, C, C]."""
    batch, channels, height, width = features.shape
    flat = features.float().reshape(batch, channels, height * width)
    return flat @ flat.transpose(1, 2) / (channels * height * width)


def gram_loss(
    prediction_features: Sequence[torch.Tensor],
    target_features: Sequence[torch.Tensor],
    layer_weights: Sequence[float] = GRAM_LAYER_WEIGHTS,
) -> torch.Tensor:
    """Sum over layers of weight * squared Frobenius norm of the Gram difference, averaged over the batch."""
    if not len(prediction_features) == len(target_features) == len(layer_weights):
        raise ValueError("gram_loss needs one feature map per layer weight for both images")
    total = prediction_features[0].new_zeros((), dtype=torch.float32)
    for weight, prediction, target in zip(layer_weights, prediction_features, target_features):
        difference = gram_matrix(prediction) - gram_matrix(target)
        total = total + weight * difference.square().sum(dim=(1, 2)).mean()
    return total


@dataclass
class LossTerms:
    """The weighted total to optimise and its unweighted parts (for logging)."""

    total: torch.Tensor
    l2: torch.Tensor
    lpips: torch.Tensor
    gram: torch.Tensor
    latent: torch.Tensor


class DifixLoss(nn.Module):
    """`lambda_l2 * L2 + lambda_lpips * LPIPS + lambda_gram * Gram (+ lambda_latent * latent L2)`, on images in [-1, 1].

    The Gram term is switched on from step `gram_warmup_steps` on (the reference release: 2,000;
    its weights 1/1/1; the paper's formula uses 0.5 for Gram). L2 is the mean squared error in the
    network's [-1, 1] range.

    `l2_form="log-mse"` (not in the paper) replaces the L2 term by each image's log10 MSE (its PSNR
    over -10, averaged over the batch): a pair's gradient is then scaled by the inverse of its own
    error, so a nearly clean render that Difix spoils by 1 dB weighs as much as a broken one it
    improves by 1 dB, instead of an order of magnitude less.

    `lambda_latent` (not in the paper, default 0) adds the L2 between the UNet's predicted latent and
    the target's: a small decoder trained from scratch takes much of its output from the degraded
    input's skip features, so the image losses reach the UNet (and any reference it attends to)
    only faintly; the latent term tells it directly what to output.
    """

    def __init__(
        self,
        lambda_l2: float = 1.0,
        lambda_lpips: float = 1.0,
        lambda_gram: float = 1.0,
        gram_warmup_steps: int = 2000,
        perceptual_backbone: PerceptualBackbone = "pretrained",
        vgg16_weights: str | Path | None = None,
        lambda_latent: float = 0.0,
        l2_form: L2Form = "mse",
    ):
        super().__init__()
        if l2_form not in get_args(L2Form):
            raise Difix3DError(f"l2_form must be one of {', '.join(get_args(L2Form))}, got {l2_form!r}")
        self.l2_form = l2_form
        self.lambda_l2, self.lambda_lpips, self.lambda_gram = lambda_l2, lambda_lpips, lambda_gram
        self.lambda_latent = lambda_latent
        self.gram_warmup_steps = gram_warmup_steps
        self.perceptual_backbone = perceptual_backbone
        self.uses_perceptual = lambda_lpips > 0 or lambda_gram > 0
        self.vgg: nn.Module | None = None
        if self.uses_perceptual:
            self.vgg = self._build_vgg(perceptual_backbone, vgg16_weights)

    @staticmethod
    def _build_vgg(perceptual_backbone: PerceptualBackbone, vgg16_weights: str | Path | None) -> nn.Module:
        if perceptual_backbone == "random":
            logger.warning(
                "PERCEPTUAL BACKBONE IS RANDOM: LPIPS and Gram losses use an untrained VGG-16 "
                "(asked for with perceptual_backbone='random'); the trained model will not match one "
                "trained with ImageNet features."
            )
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_RANDOM_BACKBONE_SEED)
                return build_lpips_network("vgg", None)
        if perceptual_backbone != "pretrained":
            raise Difix3DError(f"perceptual_backbone must be 'pretrained' or 'random', got {perceptual_backbone!r}")
        features = load_imagenet_features("vgg", vgg16_weights)
        if features is None:
            raise Difix3DError(
                missing_weights_message("vgg", vgg16_weights)
                + " (or train without pretrained features: --perceptual-backbone random)"
            )
        logger.info("perceptual losses use VGG-16 weights from %s", find_imagenet_weights("vgg", vgg16_weights))
        return build_lpips_network("vgg", features)

    def vgg_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """VGG-16 relu1_2 … relu5_3 features of [B, 3, H, W] images in [-1, 1]."""
        return list(self.vgg.net(self.vgg.scaling_layer(images)))

    def lpips_from_features(self, prediction: Sequence[torch.Tensor], target: Sequence[torch.Tensor]) -> torch.Tensor:
        """LPIPS (batch mean) from precomputed VGG features, exactly as `lpips.LPIPS` combines them."""
        import lpips  # with torchvision, 2-3 s: imported by what computes a loss, not by `difix3d --help`

        total = prediction[0].new_zeros((), dtype=torch.float32)
        for linear, feature_pred, feature_target in zip(self.vgg.lins, prediction, target):
            difference = (lpips.normalize_tensor(feature_pred.float()) - lpips.normalize_tensor(feature_target.float())).square()
            total = total + linear(difference).float().mean()
        return total

    def forward(
        self,
        prediction: torch.Tensor,
        target: torch.Tensor,
        step: int,
        predicted_latent: torch.Tensor | None = None,
        target_latent: torch.Tensor | None = None,
    ) -> LossTerms:
        """Loss of [B, 3, H, W] predictions against targets, both in [-1, 1], at training `step`;
        the latents are needed when `lambda_latent` > 0 (`Difix.forward(..., return_latent=True)`
        and `Difix.target_latent`)."""
        zero = prediction.new_zeros((), dtype=torch.float32)
        latent_value = zero
        if self.lambda_latent > 0:
            if predicted_latent is None or target_latent is None:
                raise ValueError("lambda_latent > 0 needs predicted_latent and target_latent")
            latent_value = F.mse_loss(predicted_latent.float(), target_latent.float())
        if self.l2_form == "log-mse":
            per_image = (prediction.float() - target.float()).square().flatten(1).mean(dim=1)
            l2, pixel_value = per_image.mean(), torch.log10(per_image + LOG_MSE_FLOOR).mean()
        else:
            l2 = pixel_value = F.mse_loss(prediction.float(), target.float())
        lpips_value, gram_value = zero, zero
        gram_active = self.lambda_gram > 0 and step >= self.gram_warmup_steps
        if self.lambda_lpips > 0 or gram_active:
            prediction_features = self.vgg_features(prediction)
            with torch.no_grad():
                target_features = self.vgg_features(target)
            if self.lambda_lpips > 0:
                lpips_value = self.lpips_from_features(prediction_features, target_features)
            if gram_active:
                gram_value = gram_loss(prediction_features, target_features)
        total = self.lambda_l2 * pixel_value + self.lambda_lpips * lpips_value
        if gram_active:
            total = total + self.lambda_gram * gram_value
        if self.lambda_latent > 0:
            total = total + self.lambda_latent * latent_value
        return LossTerms(
            total=total, l2=l2.detach(), lpips=lpips_value.detach(), gram=gram_value.detach(), latent=latent_value.detach()
        )
