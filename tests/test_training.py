"""`difix3d train` on a tiny model and a 4-pair 32x32 dataset, random perceptual backbone (by flag)."""

import dataclasses
import json
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from difix3d.cli import main
from difix3d.errors import Difix3DError
from difix3d.imagenet_weights import find_imagenet_weights
from difix3d.models.checkpoint import load_difix
from difix3d.training.finetune import TrainConfig, load_dataset, load_pair_images, train


def _write_pair(root, index, size=(32, 32), target_size=None):
    rng = np.random.default_rng(index)
    y, x = np.mgrid[0 : size[0], 0 : size[1]]
    clean = np.stack([x / size[1], y / size[0], np.full(size, 0.2 * index % 1)], -1)
    degraded = np.clip(clean + rng.normal(0, 0.15, clean.shape), 0, 1)
    images = {"in": degraded, "gt": clean, "ref": np.roll(clean, 3, axis=1)}
    if target_size is not None:
        images["gt"] = np.zeros((*target_size, 3))
    for name, image in images.items():
        iio.imwrite(root / f"{name}{index}.png", (image * 255).astype(np.uint8))
    return {"image": f"in{index}.png", "target_image": f"gt{index}.png", "ref_image": f"ref{index}.png", "prompt": "remove degradation"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    content = {"train": {f"p{i}": _write_pair(root, i) for i in range(4)}, "test": {"t0": _write_pair(root, 9)}}
    (root / "data.json").write_text(json.dumps(content))
    return root / "data.json"


def _config(dataset, output, **overrides):
    settings = dict(
        dataset=dataset,
        output=output,
        model="random-tiny-architecture",
        steps=30,
        crop_size=24,
        learning_rate=1e-4,
        gram_warmup_steps=5,
        perceptual_backbone="random",
        checkpoint_every=10,
        eval_every=15,
        log_every=1,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.fixture(scope="module")
def full_run(dataset, tmp_path_factory):
    """An uninterrupted 30-step run."""
    torch.set_num_threads(1)
    output = tmp_path_factory.mktemp("full")
    return output, train(_config(dataset, output))


def test_training_lowers_the_loss_and_writes_its_outputs(full_run, dataset):
    output, result = full_run
    assert len(result.losses) == 30 and result.final_step == 30
    assert np.mean(result.losses[-5:]) < 0.9 * np.mean(result.losses[:5])
    assert [e["step"] for e in result.evaluations] == [15, 30]
    assert {"psnr", "ssim", "input_psnr", "input_ssim"} <= set(result.evaluations[-1]) and result.evaluations[-1]["lpips_net"] == "alex"
    # LPIPS (AlexNet) is reported where its ImageNet weights are present (`difix3d weights`), else said n/a.
    has_alexnet = find_imagenet_weights("alex") is not None
    assert ("lpips" in result.evaluations[-1]) == has_alexnet
    assert (output / "eval" / "step-00000030.png").is_file()
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["step-00000020", "step-00000030"]
    assert any((output / "tensorboard").iterdir())
    card = (output / "README.md").read_text()
    assert "RANDOM (untrained) VGG-16" in card and "30 ×" in card and "tiny" in card and "PSNR" in card and "(input " in card
    assert ("LPIPS v0.1 with AlexNet" if has_alexnet else "LPIPS n/a: AlexNet ImageNet weights not found") in card
    # Paths relative to the card's folder, never the machine's.
    assert f"**Data**: `../{dataset.parent.name}/data.json`" in card and str(output.parent) not in card


def test_only_the_trainable_parts_change(full_run):
    output, _ = full_run
    start, trained = load_difix("random-tiny-architecture").state_dict(), load_difix(output).state_dict()
    assert start.keys() == trained.keys()
    changed = {key for key in start if not torch.equal(start[key], trained[key])}
    assert not any(key.startswith("vae.encoder.") for key in changed)
    assert any(key.startswith("unet.") for key in changed)
    assert any("lora_" in key for key in changed) and any("skip_conv" in key for key in changed)


def test_residual_output_is_switched_on_and_kept(dataset, tmp_path):
    first, second = tmp_path / "residual", tmp_path / "onwards"
    train(_config(dataset, first, steps=2, eval_every=0, residual_output=True))
    assert load_difix(first).config.residual_output and "**Output**: residual" in (first / "README.md").read_text()
    train(_config(dataset, second, steps=1, eval_every=0, model=str(first)))  # without the flag
    assert load_difix(second).config.residual_output


def test_resume_continues_bit_for_bit(full_run, dataset, tmp_path):
    _, uninterrupted = full_run
    output = tmp_path / "resumed"
    first = train(_config(dataset, output, steps=10))
    assert first.losses == uninterrupted.losses[:10]
    with pytest.raises(Difix3DError, match="--resume"):
        train(_config(dataset, output, steps=12))
    resumed = train(_config(dataset, output, steps=12, resume=True))
    assert resumed.first_step == 11
    assert resumed.losses == uninterrupted.losses[10:12]
    # A resumed run takes its own learning rates (the UNet's, the decoder adapters'), not the ones
    # stored in the optimizer state.
    train(_config(dataset, output, steps=13, resume=True, learning_rate=1e-3))
    newest = _newest_optimizer_state(output)
    assert [group["lr"] for group in torch.load(newest, weights_only=True)["param_groups"]] == [1e-3, 1e-3]
    # A checkpoint from before the UNet had its own group (one group, the UNet's parameters first) resumes.
    saved = torch.load(newest, weights_only=True)
    unet, adapters = saved["param_groups"]
    saved["param_groups"] = [{**unet, "params": unet["params"] + adapters["params"]}]
    torch.save(saved, newest)
    train(_config(dataset, output, steps=14, resume=True, learning_rate=1e-3, unet_learning_rate=5e-3))
    newest = _newest_optimizer_state(output)
    assert [group["lr"] for group in torch.load(newest, weights_only=True)["param_groups"]] == [5e-3, 1e-3]


def _newest_optimizer_state(output: Path) -> Path:
    return sorted((output / "checkpoints").iterdir())[-1] / "optimizer.pt"


def test_missing_file_fails_before_training_with_the_path(dataset, tmp_path, capsys):
    content = json.loads(dataset.read_text())
    content["train"]["p1"]["target_image"] = "gone.png"
    content["test"]["t0"]["ref_image"] = str(tmp_path / "also_gone.png")
    bad = dataset.parent / "bad.json"
    bad.write_text(json.dumps(content))
    output = tmp_path / "never"
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--dataset", str(bad), "--output", str(output), "--model", "random-tiny-architecture", "--perceptual-backbone", "random"])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "2 missing file(s)" in message and str(dataset.parent / "gone.png") in message and "also_gone.png" in message
    assert not output.exists()


def test_size_rule_resizes_same_aspect_and_refuses_others(tmp_path):
    content = {"train": {"big": _write_pair(tmp_path, 0, target_size=(64, 64))}}
    (tmp_path / "ok.json").write_text(json.dumps(content))
    pair = load_dataset(tmp_path / "ok.json")["train"][0]
    image, target, ref = load_pair_images(pair)
    assert image.shape == target.shape == ref.shape == (3, 32, 32)
    content = {"train": {"wide": _write_pair(tmp_path, 1, target_size=(32, 48))}}
    (tmp_path / "bad.json").write_text(json.dumps(content))
    with pytest.raises(Difix3DError, match="same aspect ratio"):
        load_dataset(tmp_path / "bad.json")


def test_mixed_references_and_resume_without_checkpoint_are_refused(dataset, tmp_path):
    content = json.loads(dataset.read_text())
    del content["train"]["p2"]["ref_image"]
    mixed = dataset.parent / "mixed.json"
    mixed.write_text(json.dumps(content))
    with pytest.raises(Difix3DError, match="mixes pairs with and without ref_image"):
        load_dataset(mixed)
    with pytest.raises(Difix3DError, match="no checkpoint"):
        train(_config(dataset, tmp_path / "empty", resume=True))


def test_config_defaults_follow_the_release_recipe():
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    assert defaults["learning_rate"] == 2e-5 and defaults["weight_decay"] == 1e-2 and defaults["max_grad_norm"] == 1.0
    assert defaults["gram_warmup_steps"] == 2000 and defaults["batch_size"] == 1


@pytest.mark.parametrize("damage", ["random bytes", "truncated"])
def test_unreadable_image_fails_before_training(dataset, tmp_path, damage):
    """Issue 14 case 7: random bytes gave a ZeroDivisionError; a truncated PNG failed at step 1."""
    import subprocess
    import sys

    content = json.loads(dataset.read_text())
    pair = content["train"]["p1"]
    source = dataset.parent / pair["target_image"]
    broken = tmp_path / "broken.png"
    if damage == "random bytes":
        broken.write_bytes(np.random.default_rng(0).integers(0, 256, 2048, dtype=np.uint8).tobytes())
    else:
        data = source.read_bytes()
        broken.write_bytes(data[: len(data) * 2 // 3])
    pair["target_image"] = str(broken)
    bad = dataset.parent / f"unreadable_{damage.replace(' ', '_')}.json"  # paths in it are relative to it
    bad.write_text(json.dumps(content))
    output = tmp_path / "never"
    difix3d = str(Path(sys.executable).parent / "difix3d")
    result = subprocess.run(
        [difix3d, "train", "--dataset", str(bad), "--output", str(output), "--model", "random-tiny-architecture",
         "--perceptual-backbone", "random"],
        capture_output=True, text=True,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith(f"difix3d: error: cannot read image {broken}") and result.stderr.count("\n") == 1
    assert not output.exists()


def test_latent_loss_term_trains_and_is_on_the_model_card(dataset, tmp_path):
    torch.set_num_threads(1)
    result = train(_config(dataset, tmp_path, steps=2, eval_every=0, checkpoint_every=2, lambda_latent=0.5, lambda_lpips=0, lambda_gram=0))
    assert result.final_step == 2
    assert "0.5·L2 of the UNet's latent" in (tmp_path / "README.md").read_text()


def test_moving_average_is_what_is_saved_and_resumes_exactly(full_run, dataset, tmp_path):
    """--ema-decay: training itself is unchanged, the saved model is the average, and a resumed run
    ends with the same average as an uninterrupted one."""
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    _, uninterrupted = full_run
    decay = 0.8
    whole = train(_config(dataset, tmp_path / "whole", steps=6, ema_decay=decay, checkpoint_every=1, keep_checkpoints=10))
    assert whole.losses == uninterrupted.losses[:6]
    steps = [load_file(path / "trainable.safetensors") for path in sorted((tmp_path / "whole" / "checkpoints").iterdir())]
    expected = dict(steps[0])  # the first update takes the weights as they are
    for weights in steps[1:]:
        expected = {name: decay * expected[name] + (1 - decay) * weights[name] for name in expected}
    saved = load_difix(tmp_path / "whole").state_dict()
    assert all(torch.allclose(saved[name], expected[name], atol=1e-6) for name in expected)
    assert any(not torch.equal(saved[name], steps[-1][name]) for name in expected)
    assert "moving average of the trained weights, decay 0.8" in (tmp_path / "whole" / "README.md").read_text()

    train(_config(dataset, tmp_path / "resumed", steps=4, ema_decay=decay))
    train(_config(dataset, tmp_path / "resumed", steps=6, ema_decay=decay, resume=True))
    resumed = load_difix(tmp_path / "resumed").state_dict()
    assert all(torch.equal(resumed[name], saved[name]) for name in saved)
    with pytest.raises(Difix3DError, match="--ema-decay"):
        train(_config(dataset, tmp_path / "bad", ema_decay=1.0))
