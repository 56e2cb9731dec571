"""The ground-truth data engine and the autoencoder stage, on a tiny procedural scene."""

from __future__ import annotations

import json

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from difix3d.data.curation import CurateConfig, curate
from difix3d.data.ground_truth_pairs import GroundTruthPairsConfig, novel_poses
from difix3d.data.scenes import build_scene, load_ground_truth
from difix3d.errors import Difix3DError
from difix3d.models.checkpoint import load_difix, save_pretrained
from difix3d.models.difix import Difix
from difix3d.training.autoencoder import (
    AutoencoderConfig,
    autoencoder_psnr,
    cosine_learning_rate,
    decode_with_degraded_skips,
    degraded_skip_psnr,
    identity_start,
    pretrain_autoencoder,
    reconstruct,
)

TINY = GroundTruthPairsConfig(
    steps=12, snapshot_steps=(6, 12), num_extreme=2, progress_fractions=(0.5,), num_wide=1, seed_points=300, supersample=1
)


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gt") / "scene_a"
    build_scene(folder, seed=5, width=64, height=48, num_train=4, num_eval=1, log=lambda message: None, sfm=False)
    return folder


def test_novel_poses_are_named_seeded_and_inside_the_room(scene):
    truth = load_ground_truth(scene)
    poses = novel_poses(truth, TINY)
    assert list(poses) == ["extreme_000", "extreme_000_at_50", "extreme_001", "extreme_001_at_50", "wide_000",
                           "training_000", "training_001", "training_002", "training_003"]  # fmt: skip
    assert all(np.allclose(poses[name], again) for name, again in novel_poses(truth, TINY).items())
    for pose in poses.values():
        assert np.allclose(pose[:3, :3] @ pose[:3, :3].T, np.eye(3), atol=1e-6)
        assert np.all(np.abs(pose[:2, 3]) < truth.layout.room_half_size) and 0 < pose[2, 3] < truth.layout.room_height


def test_curate_ground_truth_pairs_renders_with_truth_and_nearest_training_view(scene, tmp_path):
    out = tmp_path / "pairs"
    config = CurateConfig(scene=[scene], out=out, strategies=("ground-truth",), ground_truth_steps=10,
                          ground_truth_extreme=2, ground_truth_wide=1, test_fraction=0.0)  # fmt: skip
    result = curate(config)
    assert result.curated == [("scene_a", "ground-truth")] and result.num_train == (7 + 4) * 3
    pairs = json.loads((out / "scene_a" / "ground-truth.json").read_text())["pairs"]
    assert {pair["step"] for pair in pairs} == {4, 7, 10}
    truth = load_ground_truth(scene)
    train_names = {frame.name for frame in truth.frames if frame.split == "train"}
    for pair in pairs:
        for key in ("image", "target_image", "ref_image"):
            assert iio.imread(out / pair[key]).shape == (48, 64, 3)
        assert pair["ref_view"] in train_names
    # The target is the ray-traced truth at the pair's pose.
    pair = pairs[0]
    expected = truth.render(np.array(pair["pose"]), supersample=4).rgb
    assert np.abs(iio.imread(out / pair["target_image"]) / 255 - expected).max() <= 0.5 / 255 + 1e-4
    # Near-identity pairs: a render at a training pose, its training image as target, the nearest
    # other training view as reference.
    frames = [frame for frame in truth.frames if frame.split == "train"]
    for pair in (pair for pair in pairs if pair["view"].startswith("training_")):
        own = frames[int(pair["view"].removeprefix("training_"))]
        assert np.array_equal(iio.imread(out / pair["target_image"]), iio.imread(scene / own.file_path)[..., :3])
        assert pair["ref_view"] != own.name
    # Finished scenes are skipped; other parameters are refused.
    assert curate(config).skipped == [("scene_a", "ground-truth")]
    with pytest.raises(Difix3DError, match="curated with"):
        curate(CurateConfig(**{**vars(config), "ground_truth_steps": 12}))


def test_autoencoder_pretraining_learns_to_reproduce_from_a_unit_scale_latent(scene, tmp_path):
    images = torch.stack([torch.from_numpy(iio.imread(path)[..., :3]).permute(2, 0, 1).float() / 127.5 - 1
                          for path in sorted((scene / "images").glob("*.png"))])  # fmt: skip
    difix = Difix.from_config("tiny")
    before = autoencoder_psnr(difix, images)
    pretrain_autoencoder(difix, images, AutoencoderConfig(steps=40, batch_size=2, crop=48, learning_rate=3e-3), progress=False)
    after = autoencoder_psnr(difix, images)
    assert after > before + 3
    # The latent carries the image (the UNet only sees latents), not only the skip convs.
    assert autoencoder_psnr(difix, images, skips=False) > before + 3
    # The UNet sees unit-scale latents, and the scaling factor travels with the saved model.
    with torch.no_grad():
        assert float(difix.encode(images)[0].std()) == pytest.approx(1.0, rel=1e-4)
    save_pretrained(difix, tmp_path / "autoencoder")
    loaded = load_difix(str(tmp_path / "autoencoder"), device="cpu")
    assert loaded.vae.config.scaling_factor == difix.vae.config.scaling_factor != 0.18215
    with torch.no_grad():
        assert torch.allclose(reconstruct(loaded, images), reconstruct(difix, images), atol=1e-6)
    # Back to Difix's training split: only the adapters of the VAE are trainable.
    trainable = {name for name, parameter in difix.vae.named_parameters() if parameter.requires_grad}
    assert trainable and all("lora_" in name or "skip_conv_" in name for name in trainable)


def test_degraded_skip_term_decodes_the_clean_latent_with_the_broken_skips():
    clean = torch.rand(3, 3, 32, 32) * 2 - 1
    degraded = clean.clone()
    degraded[..., 8:24, 8:24] = -1.0  # a hole, as in a broken render
    config = AutoencoderConfig(steps=4, batch_size=2, crop=32, learning_rate=1e-3)
    with pytest.raises(ValueError, match="needs pairs"):
        pretrain_autoencoder(Difix.from_config("tiny"), clean, AutoencoderConfig(degraded_skip_weight=1.0), progress=False)
    plain = pretrain_autoencoder(Difix.from_config("tiny"), clean, config, progress=False)
    with torch.no_grad():  # with unbroken skips it is the plain reproduction
        assert torch.equal(decode_with_degraded_skips(plain, clean, clean), reconstruct(plain, clean))
    # The term changes training (its effect on the ceiling, over thousands of steps, is measured by
    # scripts/train_embedded_difix.py: held_out_degraded_skip_psnr).
    torch.manual_seed(0)
    taught = pretrain_autoencoder(Difix.from_config("tiny"), clean, AutoencoderConfig(**{**vars(config), "degraded_skip_weight": 1.0}),
                                  progress=False, pairs=(degraded, clean))  # fmt: skip
    torch.manual_seed(0)
    untaught = pretrain_autoencoder(Difix.from_config("tiny"), clean, config, progress=False)
    assert not torch.equal(taught.vae.decoder.conv_out.weight, untaught.vae.decoder.conv_out.weight)
    assert np.isfinite(degraded_skip_psnr(taught, degraded, clean))


def test_autoencoder_resumes_exactly_from_its_checkpoint(tmp_path, monkeypatch):
    import difix3d.training.autoencoder

    images = torch.rand(3, 3, 32, 32) * 2 - 1
    config = AutoencoderConfig(steps=6, batch_size=2, crop=24, learning_rate=1e-3)
    straight = pretrain_autoencoder(Difix.from_config("tiny"), images, config, progress=False)

    checkpoint = tmp_path / "autoencoder.pt"
    real_replace = difix3d.training.autoencoder.os.replace

    def replace_then_die(source, destination):  # the process is killed right after its step-3 checkpoint
        real_replace(source, destination)
        raise KeyboardInterrupt

    monkeypatch.setattr(difix3d.training.autoencoder.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        pretrain_autoencoder(Difix.from_config("tiny"), images, config, progress=False, checkpoint=checkpoint, checkpoint_every=3)
    monkeypatch.setattr(difix3d.training.autoencoder.os, "replace", real_replace)
    assert torch.load(checkpoint, weights_only=True)["step"] == 3
    resumed = pretrain_autoencoder(Difix.from_config("tiny"), images, config, progress=False, checkpoint=checkpoint, checkpoint_every=3)
    for (name, a), b in zip(straight.vae.state_dict().items(), resumed.vae.state_dict().values()):
        assert torch.equal(a, b), name


def test_identity_start_makes_difix_reproduce_its_autoencoder():
    difix = Difix.from_config("tiny")
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    pretrain_autoencoder(difix, images, AutoencoderConfig(steps=2, batch_size=2, crop=32), progress=False)
    with torch.no_grad():
        expected = reconstruct(difix, images).clamp(-1, 1)
        assert not torch.allclose(difix(images[:, None]), expected, atol=1e-3)
        identity_start(difix)
        assert torch.allclose(difix(images[:, None]), expected, atol=1e-5)
        with_reference = torch.stack([images, images.flip(0)], dim=1)
        assert torch.allclose(difix(with_reference), expected, atol=1e-5)
        # What it decodes is the latent-loss target of its own input (the gain folded into the decoder).
        _, latent = difix(images[:, None], return_latent=True)
        assert difix.config.latent_gain == pytest.approx(difix.x0_scale)
        assert torch.allclose(latent, difix.target_latent(images), atol=1e-5)


def test_autoencoder_resumed_with_more_steps_stretches_its_schedule(tmp_path):
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    checkpoint = tmp_path / "autoencoder.pt"
    short = AutoencoderConfig(steps=3, batch_size=2, crop=24, learning_rate=1e-3)
    pretrain_autoencoder(Difix.from_config("tiny"), images, short, progress=False, checkpoint=checkpoint, checkpoint_every=3)
    finished = torch.load(checkpoint, weights_only=True)
    longer = AutoencoderConfig(**{**vars(short), "steps": 6})
    pretrain_autoencoder(Difix.from_config("tiny"), images, longer, progress=False, checkpoint=checkpoint, checkpoint_every=3)
    state = torch.load(checkpoint, weights_only=True)
    assert state["step"] == 6
    # The finished 3-step run had decayed to 0; the longer run goes on learning (a recursive cosine stayed at 0).
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(cosine_learning_rate(1e-3, 5, 6))
    assert cosine_learning_rate(1e-3, 3, 6) == pytest.approx(5e-4)
    assert any(not torch.equal(finished["vae"][key], value) for key, value in state["vae"].items())
