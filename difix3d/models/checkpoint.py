"""Loading and saving Difix models: one entry point, `load_difix(spec)`, for every caller.

Sources, all turned into (DifixConfig, state dict in Difix's own key layout) and then loaded
strictly, with an error that lists the first mismatches:
- "random-tiny-architecture" / "random-sd-turbo-architecture": random weights (`Difix.from_config`),
  for tests and timing; the bare architecture names are refused so that noise is never loaded by accident;
- "embedded": the Difix that ships in the package (`difix3d.models.ids.EMBEDDED_DIFIX`);
- a difix3d folder (`save_pretrained`: `difix3d_config.json` + `model.safetensors`);
- a diffusers folder with `unet/`, `vae/` (and `text_encoder/` + `tokenizer/` to encode the
  prompt): SD-Turbo itself (the Difix additions start from their initialisation) or a released
  Difix whose VAE stores the decoder peft-wrapped (`...base_layer.weight` + `lora_A`/`lora_B`);
- a Hugging Face Hub id of either folder kind (`stabilityai/sd-turbo`, `nvidia/difix`, `nvidia/difix_ref`);
- a reference-release training checkpoint (`model_*.pkl`) applied on top of a `base` (any of the above).

Whether a model was trained with reference views (`DifixConfig.reference_views`) comes from:
a difix3d folder's config; a diffusers folder's layout -- `nvidia/difix_ref` ships its multi-view
UNet as custom code (`model_index.json` names the module `unet_2d_condition`, the folder holds
`unet/unet_2d_condition.py`), while `nvidia/difix` and SD-Turbo name diffusers' own UNet; a `.pkl`'s
`mv_unet` field (the release's switch, written by `save_release_checkpoint`), else assumed (the
release trains Difix-ref with `--mv_unet`). A `.pkl` written by `save_release_checkpoint` also
records `residual_output` (absent: the release's decoded image). The Difix settings that a hub VAE
config carries beside diffusers' own (`gamma`, `ignore_skip`, `lora_rank`) are read into the DifixConfig.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from difix3d.errors import Difix3DError
from difix3d.models.ids import (
    DEFAULT_BASE,
    EMBEDDED_DIFIX,
    EMBEDDED_NAME,
    random_weights_architecture,
    random_weights_name,
)
from difix3d.models.difix import LORA_ADAPTER, NAMED_ARCHITECTURES, Difix, DifixConfig, is_adapter_key

logger = logging.getLogger(__name__)

CONFIG_FILE = "difix3d_config.json"
WEIGHTS_FILE = "model.safetensors"
RELEASE_SUFFIXES = (".pkl", ".pt", ".pth", ".ckpt")
_HUB_FILES = [
    CONFIG_FILE,
    WEIGHTS_FILE,
    "model_index.json",
    "*/config.json",
    "unet/*.py",  # never run: its presence marks a multi-view (reference) UNet
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
    "tokenizer/*",
]
_COMPONENT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.bin",
)
_MAX_LISTED = 5
# Keys of the hub VAE config that belong to Difix, not to diffusers' AutoencoderKL.
_VAE_DIFIX_KEYS = ("gamma", "ignore_skip", "lora_rank")

StateDict = dict[str, torch.Tensor]


def load_difix(
    spec: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    base: str | os.PathLike = DEFAULT_BASE,
) -> Difix:
    """Load a Difix from a name, a folder, a hub id or a release checkpoint (see the module doc).

    `base` is only used for a release `.pkl`: the SD-Turbo (or other) model it was trained from.
    Random weights only come from the names "random-tiny-architecture" and "random-sd-turbo-architecture".
    Returns the model in eval mode.
    """
    spec = EMBEDDED_DIFIX if str(spec) == EMBEDDED_NAME else str(spec)
    random_architecture = random_weights_architecture(spec)
    if random_architecture in NAMED_ARCHITECTURES:
        difix = Difix.from_config(random_architecture)
    elif spec in NAMED_ARCHITECTURES:
        raise Difix3DError(
            f"{spec!r} names an architecture, not trained weights: use a trained Difix (nvidia/difix_ref, "
            f"a folder, a release .pkl); random weights, for tests only, are {random_weights_name(spec)!r}"
        )
    elif Path(spec).expanduser().is_file() and Path(spec).suffix.lower() in RELEASE_SUFFIXES:
        difix = load_release_checkpoint(Path(spec).expanduser(), base=base)
    else:
        config, state = _read_model(spec)
        difix = _instantiate(config, state, source=spec)
    return difix.to(device=device, dtype=dtype).eval()


# --------------------------------------------------------------------------------- difix3d format


def save_pretrained(difix: Difix, directory: str | os.PathLike) -> None:
    """Write `difix3d_config.json` and `model.safetensors` (every weight and the prompt buffer)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(difix.config.to_dict(), indent=2) + "\n")
    state = {key: value.detach().contiguous() for key, value in difix.state_dict().items()}
    save_file(state, directory / WEIGHTS_FILE, metadata={"format": "pt"})


def load_pretrained(
    directory: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Difix:
    """Load a folder written by `save_pretrained`, bit-exact (in the dtype it was saved in unless `dtype` differs)."""
    config, state = _read_difix_folder(Path(directory))
    return _instantiate(config, state, source=str(directory)).to(device=device, dtype=dtype).eval()


def _read_difix_folder(directory: Path) -> tuple[DifixConfig, StateDict]:
    try:
        config = DifixConfig.from_dict(json.loads((directory / CONFIG_FILE).read_text()))
    except (OSError, json.JSONDecodeError, TypeError) as error:
        raise Difix3DError(f"cannot read {directory / CONFIG_FILE}: {error}") from None
    return config, _read_weights(directory / WEIGHTS_FILE)


# --------------------------------------------------------------------------------- reference release


def save_release_checkpoint(difix: Difix, path: str | os.PathLike, optimizer_state: dict | None = None) -> None:
    """Write the reference release's training-checkpoint layout (`model_*.pkl`, a torch.save dict)."""
    vae_state = {key: value for key, value in difix.vae.state_dict().items() if is_adapter_key(key)}
    torch.save(
        {
            "state_dict_unet": difix.unet.state_dict(),
            "state_dict_vae": vae_state,
            "vae_lora_target_modules": list(difix.config.lora_target_modules),
            "rank_vae": difix.config.lora_rank,
            "mv_unet": difix.config.reference_views,  # the release's name; its loader ignores extra keys
            "residual_output": difix.config.residual_output,  # ours (the release decodes the image)
            "optimizer": optimizer_state or {},
        },
        path,
    )


def load_release_checkpoint(path: str | os.PathLike, base: str | os.PathLike = DEFAULT_BASE) -> Difix:
    """Apply a reference-release `.pkl` (UNet weights, decoder LoRA + skip convs, LoRA rank and
    targets) on top of the weights of `base` (a hub id or folder of SD-Turbo, or any Difix)."""
    try:
        release = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types for corrupt or foreign files
        raise Difix3DError(f"cannot read release checkpoint {path}: {_load_failure(error)}") from None
    required = ("state_dict_unet", "state_dict_vae", "vae_lora_target_modules", "rank_vae")
    if not isinstance(release, dict) or any(key not in release for key in required):
        found = sorted(release) if isinstance(release, dict) else type(release).__name__
        raise Difix3DError(f"{path} is not a Difix release checkpoint: needs keys {', '.join(required)}; found {found}")
    base_config, base_state = _read_model(str(base))
    if "mv_unet" not in release:
        logger.info("%s does not record whether it was trained with references (mv_unet): assuming it was", path)
    config = dataclasses.replace(
        base_config,
        lora_rank=int(release["rank_vae"]),
        lora_target_modules=list(release["vae_lora_target_modules"]),
        reference_views=bool(release.get("mv_unet", True)),
        residual_output=bool(release.get("residual_output", False)),
    )
    # The base gives everything the release does not train; its own adapters (if any) are replaced.
    state = {key: value for key, value in base_state.items() if not is_adapter_key(key)}
    state.update({f"unet.{key}": value for key, value in release["state_dict_unet"].items()})
    state.update({f"vae.{key}": value for key, value in release["state_dict_vae"].items()})
    return _instantiate(config, state, source=f"{path} (on base {base})")


# --------------------------------------------------------------------------------- folders and the hub


def _read_model(spec: str) -> tuple[DifixConfig, StateDict]:
    """A difix3d or diffusers folder, local or on the hub -> config and state dict."""
    path = Path(spec).expanduser()
    if not path.is_dir():
        if path.exists() or not _looks_like_hub_id(spec):
            raise Difix3DError(
                f"no Difix model at {spec!r}: expected a hub id (owner/name, e.g. nvidia/difix_ref), "
                f"a difix3d or diffusers folder, or a release checkpoint ({', '.join(RELEASE_SUFFIXES)})"
            )
        path = _download(spec)
    if (path / CONFIG_FILE).is_file():
        return _read_difix_folder(path)
    if (path / "unet").is_dir() and (path / "vae").is_dir():
        return _read_diffusers_folder(path)
    raise Difix3DError(f"{spec} holds neither {CONFIG_FILE} (difix3d) nor unet/ and vae/ (diffusers)")


def _looks_like_hub_id(spec: str) -> bool:
    return re.fullmatch(r"[\w][\w.-]*/[\w][\w.-]*", spec) is not None


def _hub_offline() -> bool:
    from huggingface_hub import constants

    # Read the variable now too: huggingface_hub only reads it when first imported.
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"} or constants.HF_HUB_OFFLINE


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    offline = _hub_offline()
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES, local_files_only=offline))
    except Exception as error:  # network, auth, missing repo, missing cache: all end the same way
        tried = "the local Hugging Face cache only (HF_HUB_OFFLINE is set)" if offline else "the Hugging Face Hub and the local cache"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise Difix3DError(
            f"cannot get Difix model {repo_id!r}: tried {tried}: {reason}. "
            f"On a machine with network access run `hf download {repo_id} --local-dir DIR`, "
            f"then give that folder as the model instead of the id"
        ) from None


def _read_diffusers_folder(folder: Path) -> tuple[DifixConfig, StateDict]:
    """A diffusers pipeline folder (SD-Turbo or a released Difix) -> config and state dict."""
    unet_config = _init_arguments(_read_json(folder / "unet" / "config.json"), UNet2DConditionModel)
    vae_raw = _read_json(folder / "vae" / "config.json")
    difix_settings = {key: vae_raw.pop(key) for key in _VAE_DIFIX_KEYS if key in vae_raw}
    vae_config = _init_arguments(vae_raw, AutoencoderKL)
    vae_state = _read_weights(_component_weights(folder / "vae"))
    config = DifixConfig(
        unet=unet_config, vae=vae_config, architecture=folder.name, reference_views=_has_multiview_unet(folder)
    )
    lora_a = [key for key in vae_state if ".lora_A." in key]
    if lora_a:  # a released Difix: its own LoRA rank and targets
        config.lora_rank = int(vae_state[lora_a[0]].shape[0])
        config.lora_target_modules = sorted({key.split(".lora_A.")[0] for key in lora_a})
    # The config's values win: a rank that disagrees with the weights is reported by the strict load.
    config.gamma = float(difix_settings.get("gamma", config.gamma))
    config.ignore_skip = bool(difix_settings.get("ignore_skip", config.ignore_skip))
    config.lora_rank = int(difix_settings.get("lora_rank", config.lora_rank))
    prompt_embeds = encode_prompt(folder, config.prompt)
    config.prompt_length = prompt_embeds.shape[1]
    state = {f"unet.{key}": value for key, value in _read_weights(_component_weights(folder / "unet")).items()}
    state.update({f"vae.{key}": value for key, value in vae_state.items()})
    state["prompt_embeds"] = prompt_embeds
    return config, state


def _has_multiview_unet(folder: Path) -> bool:
    """Whether a diffusers folder's UNet is the release's multi-view one (custom code, as in
    `nvidia/difix_ref`) rather than diffusers' own (`nvidia/difix`, SD-Turbo)."""
    index = folder / "model_index.json"
    if index.is_file():
        unet_entry = _read_json(index).get("unet")
        if isinstance(unet_entry, list) and unet_entry and unet_entry[0]:
            return unet_entry[0] != "diffusers"  # else the name of the custom module in unet/
    return any((folder / "unet").glob("*.py"))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise Difix3DError(f"cannot read {path}: {error}") from None


def _init_arguments(raw: dict, model_class: type) -> dict:
    init_arguments = model_class.extract_init_dict(raw)[0]
    return json.loads(json.dumps(init_arguments))  # tuples -> lists, as saved


def _component_weights(component: Path) -> Path:
    for name in _COMPONENT_FILES:
        if (component / name).is_file():
            return component / name
    present = sorted(p.name for p in component.iterdir()) if component.is_dir() else []
    raise Difix3DError(f"no weights in {component}: looked for {', '.join(_COMPONENT_FILES)}; found {present}")


def _read_weights(path: Path) -> StateDict:
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # missing, truncated or foreign files
        raise Difix3DError(f"cannot read weights {path}: {_load_failure(error)}") from None


def _load_failure(error: Exception) -> str:
    """Why a file did not load, in one line. torch's own message for a refused pickle advises
    `weights_only=False` (arbitrary code execution): never pass that on."""
    text = str(error).strip()
    if "WeightsUnpickler error:" in text:
        detail = text.split("WeightsUnpickler error:", 1)[1].strip().splitlines()[0].strip()
        foreign = re.search(r"GLOBAL (\S+)", detail)
        if foreign:
            return f"it holds a Python object ({foreign.group(1)}) besides tensors, which is never unpickled; not a Difix checkpoint"
        return f"not a PyTorch checkpoint ({detail})"
    if isinstance(error, EOFError) or not text:
        return "the file is empty or truncated"
    return text.splitlines()[0]


def encode_prompt(folder: Path, prompt: str) -> torch.Tensor:
    """Encode `prompt` with the folder's CLIP tokenizer and text encoder -> [1, tokens, dim].

    Done once at load time; the text encoder is freed afterwards.
    """
    from transformers import CLIPTextModel, CLIPTokenizer

    if not (folder / "text_encoder").is_dir() or not (folder / "tokenizer").is_dir():
        raise Difix3DError(f"{folder} has no text_encoder/ and tokenizer/ to encode the prompt {prompt!r}")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
        text_encoder = CLIPTextModel.from_pretrained(str(folder / "text_encoder"))
    except (OSError, ValueError) as error:
        raise Difix3DError(f"cannot load the CLIP tokenizer/text encoder of {folder}: {error}") from None
    tokens = tokenizer(
        prompt, max_length=tokenizer.model_max_length, padding="max_length", truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        return text_encoder(tokens)[0].float()


# --------------------------------------------------------------------------------- strict loading


def _canonical_key(key: str, expected: set[str]) -> str:
    """Map checkpoint key variants onto Difix's layout: any LoRA adapter name -> "vae_skip";
    a plain decoder weight of a LoRA-wrapped layer -> its `base_layer` weight."""
    key = re.sub(r"\.lora_([AB])\.[^.]+\.", rf".lora_\1.{LORA_ADAPTER}.", key)
    if key not in expected and "." in key:
        module, leaf = key.rsplit(".", 1)
        wrapped = f"{module}.base_layer.{leaf}"
        if wrapped in expected:
            return wrapped
    return key


def _instantiate(config: DifixConfig, state: StateDict, source: str) -> Difix:
    """Build a Difix for `config` and load `state` strictly; a state without any LoRA or skip
    weights (a base model such as SD-Turbo) gets freshly initialised ones."""
    try:
        with torch.device("meta"):  # no random init of weights that are loaded next
            difix = Difix(config)
    except (ValueError, TypeError, KeyError) as error:  # e.g. LoRA targets the VAE does not have
        raise Difix3DError(f"{source}: cannot build a Difix from its config: {error}") from None
    expected = difix.state_dict()
    state = {_canonical_key(key, set(expected)): value for key, value in state.items()}
    from_base = not any(is_adapter_key(key) for key in state)
    missing = [key for key in expected if key not in state and not (from_base and is_adapter_key(key))]
    unexpected = [key for key in state if key not in expected]
    wrong_shapes = [
        f"{key} {list(value.shape)} != {list(expected[key].shape)}"
        for key, value in state.items()
        if key in expected and value.shape != expected[key].shape
    ]
    problems = [
        f"{label} ({len(keys)}): {', '.join(keys[:_MAX_LISTED])}{', ...' if len(keys) > _MAX_LISTED else ''}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape checkpoint != model", wrong_shapes))
        if keys
    ]
    if problems:
        raise Difix3DError(f"{source} does not fit a {config.architecture} Difix: " + "; ".join(problems))
    difix.to_empty(device="cpu")
    if from_base:
        logger.info("%s has no skip convs or decoder LoRA: starting them from their initialisation", source)
        difix.reset_adapters()
    difix.load_state_dict(state, strict=False)
    return difix
