"""Metrics (PSNR, SSIM, offline LPIPS) and the Difix training loss (L2 + LPIPS + Gram)."""

import logging

import pytest
import torch
import torchvision

from difix3d import imagenet_weights, metrics
from difix3d.errors import Difix3DError
from difix3d.training.losses import GRAM_LAYER_WEIGHTS, DifixLoss, gram_loss, gram_matrix


@pytest.fixture
def empty_hub(no_imagenet_weights):
    """The torch hub dir, with no cached weights (and no other source of ImageNet weights)."""
    return no_imagenet_weights / "hub"


def _images(seed=0, shape=(2, 3, 32, 32)):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=generator)


def test_psnr_identical_is_inf_and_known_value():
    image = _images()
    assert torch.isinf(metrics.psnr(image, image)).all()
    shifted = (image * 0 + 0.5), (image * 0 + 0.6)
    assert metrics.psnr(*shifted) == pytest.approx(torch.tensor([20.0, 20.0]), abs=1e-4)


def test_ssim_identical_is_one_and_drops_with_noise():
    image = _images()
    assert metrics.ssim(image, image) == pytest.approx(torch.ones(2), abs=1e-6)
    noisy = (image + 0.2 * torch.randn_like(image)).clamp(0, 1)
    assert (metrics.ssim(image, noisy) < 0.9).all()
    with pytest.raises(Difix3DError, match="at least 11x11"):
        metrics.ssim(image[..., :8, :8], image[..., :8, :8])


def test_lpips_unavailable_without_backbone_is_none_and_logged_once(empty_hub, caplog, monkeypatch):
    monkeypatch.setattr(metrics.LPIPSMetric, "_warned", set())
    image = _images()
    with caplog.at_level(logging.WARNING, logger="difix3d.metrics"):
        first = metrics.LPIPSMetric("alex")
        second = metrics.LPIPSMetric("alex")
    assert not first.available and first(image, image) is None and second(image, image) is None
    warnings = [r for r in caplog.records if "LPIPS unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "alexnet-owt-7be5be79.pth" in warnings[0].getMessage()


@pytest.mark.parametrize("net, builder", [("alex", torchvision.models.alexnet), ("vgg", torchvision.models.vgg16)])
def test_lpips_loads_backbone_from_hub_cache(empty_hub, net, builder):
    # Random torchvision weights saved where torchvision would cache the real ones: checks the
    # offline loading path (the values are not meaningful LPIPS numbers).
    torch.manual_seed(0)
    state = builder().state_dict()
    checkpoint_dir = empty_hub / "checkpoints"
    checkpoint_dir.mkdir(parents=True)
    torch.save(state, imagenet_weights.torchvision_hub_file(net))
    metric = metrics.LPIPSMetric(net)
    assert metric.available
    assert torch.equal(metric.model.net.slice1[0].weight, state["features.0.weight"])
    image = _images()
    assert metric(image, image) == pytest.approx(torch.zeros(2), abs=1e-6)
    assert (metric(image, _images(seed=1)) > 0).all()


def test_explicit_backbone_path_missing_is_an_error(empty_hub, tmp_path, monkeypatch):
    with pytest.raises(Difix3DError, match="nope.pth"):
        metrics.LPIPSMetric("vgg", weights_path=tmp_path / "nope.pth")
    monkeypatch.setenv("DIFIX3D_VGG16_WEIGHTS", str(tmp_path / "env.pth"))
    with pytest.raises(Difix3DError, match="env.pth"):
        imagenet_weights.find_imagenet_weights("vgg")


def test_gram_loss_matches_hand_computation():
    # Two layers, one image each; features written out by hand.
    pred = [torch.tensor([[[[1.0, 2.0]], [[0.0, 1.0]]]]), torch.tensor([[[[3.0]]]])]
    target = [torch.tensor([[[[1.0, 0.0]], [[2.0, 1.0]]]]), torch.tensor([[[[1.0]]]])]
    weights = (0.5, 2.0)
    # Layer 1: C=2, H*W=2 -> G = F F^T / 4.
    g_pred = torch.tensor([[1 * 1 + 2 * 2, 1 * 0 + 2 * 1], [0 * 1 + 1 * 2, 0 * 0 + 1 * 1]]) / 4
    g_target = torch.tensor([[1 * 1 + 0 * 0, 1 * 2 + 0 * 1], [2 * 1 + 1 * 0, 2 * 2 + 1 * 1]]) / 4
    layer1 = ((g_pred - g_target) ** 2).sum()
    layer2 = (3.0 * 3.0 - 1.0 * 1.0) ** 2  # C=H=W=1
    expected = 0.5 * layer1 + 2.0 * layer2
    assert torch.allclose(gram_matrix(pred[0])[0], g_pred)
    assert gram_loss(pred, target, weights) == pytest.approx(expected.item(), rel=1e-6)
    assert GRAM_LAYER_WEIGHTS == pytest.approx((1 / 2.6, 1 / 4.8, 1 / 3.7, 1 / 5.6, 10 / 1.5))


def test_difix_loss_terms_warmup_and_shared_features():
    loss = DifixLoss(lambda_l2=1.0, lambda_lpips=1.0, lambda_gram=0.5, gram_warmup_steps=5, perceptual_backbone="random")
    prediction = _images(seed=2) * 2 - 1
    target = _images(seed=3) * 2 - 1
    before, after = loss(prediction, target, step=4), loss(prediction, target, step=5)
    assert before.gram == 0 and after.gram > 0
    assert before.l2 == pytest.approx(torch.nn.functional.mse_loss(prediction, target).item())
    # LPIPS from the shared VGG features equals the lpips package's own forward.
    assert before.lpips == pytest.approx(loss.vgg(prediction, target).mean().item(), rel=1e-5)
    features_pred, features_target = loss.vgg_features(prediction), loss.vgg_features(target)
    assert after.gram == pytest.approx(gram_loss(features_pred, features_target).item(), rel=1e-5)
    assert after.total == pytest.approx((after.l2 + after.lpips + 0.5 * after.gram).item(), rel=1e-5)
    # Gradients reach the prediction, never the frozen VGG.
    prediction.requires_grad_(True)
    loss(prediction, target, step=5).total.backward()
    assert prediction.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss.vgg.parameters())


def test_random_backbone_is_reproducible_and_pretrained_missing_is_an_error(empty_hub):
    first = DifixLoss(perceptual_backbone="random")
    torch.manual_seed(123)  # the global RNG does not change the random trunk
    second = DifixLoss(perceptual_backbone="random")
    assert torch.equal(first.vgg.net.slice3[1].weight, second.vgg.net.slice3[1].weight)
    with pytest.raises(Difix3DError, match=r"vgg16-397923af\.pth.*perceptual-backbone random"):
        DifixLoss(perceptual_backbone="pretrained")
    # Without perceptual terms no backbone is needed.
    assert DifixLoss(lambda_lpips=0, lambda_gram=0).vgg is None


@pytest.mark.skipif(imagenet_weights.find_imagenet_weights("vgg") is None, reason="no VGG-16 ImageNet weights (run `difix3d weights`)")
def test_default_loss_uses_the_imagenet_vgg16():
    loss = DifixLoss()
    features = imagenet_weights.load_imagenet_features("vgg")
    assert torch.equal(loss.vgg.net.slice1[0].weight, features["0.weight"])
    assert torch.equal(getattr(loss.vgg.net.slice5, "28").weight, features["28.weight"])


def test_latent_term_is_added_when_weighted_and_needs_the_latents():
    loss = DifixLoss(lambda_l2=1.0, lambda_lpips=0.0, lambda_gram=0.0, lambda_latent=0.25)
    prediction, target = _images(seed=2) * 2 - 1, _images(seed=3) * 2 - 1
    predicted_latent, target_latent = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    terms = loss(prediction, target, step=0, predicted_latent=predicted_latent, target_latent=target_latent)
    assert terms.latent == pytest.approx(torch.nn.functional.mse_loss(predicted_latent, target_latent).item())
    assert terms.total == pytest.approx((terms.l2 + 0.25 * terms.latent).item(), rel=1e-6)
    with pytest.raises(ValueError, match="needs predicted_latent"):
        loss(prediction, target, step=0)
    assert DifixLoss(lambda_lpips=0.0, lambda_gram=0.0)(prediction, target, step=0).latent == 0


def test_log_mse_weighs_each_pair_by_its_own_error():
    loss = DifixLoss(lambda_l2=0.5, lambda_lpips=0.0, lambda_gram=0.0, l2_form="log-mse")
    target = _images(seed=3) * 2 - 1
    # One pair nearly right (error 0.01), one far off (error 0.3), as a clean and a broken render.
    prediction = (target + torch.tensor([0.01, 0.3]).view(2, 1, 1, 1)).requires_grad_(True)
    terms = loss(prediction, target, step=0)
    per_image = torch.tensor([0.01**2, 0.3**2])
    assert terms.total.item() == pytest.approx(0.5 * torch.log10(per_image + 1e-6).mean().item(), rel=1e-5)
    assert terms.l2.item() == pytest.approx(per_image.mean().item(), rel=1e-5)  # logged as the plain MSE
    terms.total.backward()
    # Growing either pair's error by the same factor (the same loss of PSNR) costs the same, where
    # under the MSE the broken pair's would cost 900x more.
    error = (prediction - target).detach()
    near, far = (prediction.grad * error).flatten(1).sum(dim=1)
    assert near.item() == pytest.approx(far.item(), rel=0.05)
    with pytest.raises(Difix3DError, match="l2_form"):
        DifixLoss(lambda_lpips=0.0, lambda_gram=0.0, l2_form="l1")
