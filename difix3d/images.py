"""Image I/O and conversions: files, videos, PIL images, numpy arrays and tensors.

Everything inside difix3d works on float RGB in [0, 1]: numpy arrays H x W x 3 when loaded from
disk, tensors [B, 3, H, W] for the networks. Grayscale is repeated to RGB, alpha is dropped,
8- and 16-bit integers are scaled to [0, 1].
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import imageio.v3 as iio
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from difix3d.errors import Difix3DError
from difix3d.files import atomic_write_bytes

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".gif")


def to_float_rgb(array: np.ndarray) -> np.ndarray:
    """Any image array (H x W, H x W x 1/2/3/4; bool, integer or float) -> float32 H x W x 3 in [0,1]."""
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 2, 3, 4) or 0 in array.shape:
        raise Difix3DError(f"not an image: array of shape {list(array.shape)}")
    if array.shape[-1] in (2, 4):  # drop alpha
        array = array[..., :-1]
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    if np.issubdtype(array.dtype, np.integer):
        return array.astype(np.float32) / np.iinfo(array.dtype).max
    return np.clip(array.astype(np.float32), 0.0, 1.0)


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file as float32 RGB H x W x 3 in [0, 1] (first frame of multi-frame files)."""
    path = Path(path)
    try:
        array = iio.imread(path)
    except Exception as error:  # imageio raises many types for unreadable files
        raise Difix3DError(f"cannot read image {path}: {error}") from None
    if array.ndim == 4:
        array = array[0]
    try:
        return to_float_rgb(array)
    except Difix3DError as error:
        raise Difix3DError(f"{path}: {error}") from None


def save_image(path: str | Path, image: np.ndarray) -> None:
    """Write float RGB in [0, 1] (H x W x 3) or uint8 as an 8-bit image (PNG by the suffix), atomically:
    an interrupted write never leaves a broken file that a resumed run would take as done."""
    path = Path(path)
    if image.dtype != np.uint8:
        image = to_uint8(image)
    atomic_write_bytes(path, iio.imwrite("<bytes>", image, extension=path.suffix))


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def list_images(directory: str | Path) -> list[Path]:
    """Image files directly in `directory`, in natural name order (frame_2 before frame_10)."""
    directory = Path(directory)
    files = [p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(files, key=_natural_key)


def is_video(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def read_video(path: str | Path) -> Iterator[np.ndarray]:
    """Frames of a video file as float32 RGB H x W x 3 in [0, 1]."""
    try:
        for frame in iio.imiter(path, plugin="pyav"):
            yield to_float_rgb(frame)
    except Difix3DError:
        raise
    except Exception as error:
        raise Difix3DError(f"cannot read video {path}: {error}") from None


# ------------------------------------------------------------------------------ 8-bit <-> float


def to_uint8(image: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Float image(s) in [0, 1] -> uint8, clipped and rounded to nearest; numpy stays numpy, tensors
    stay tensors (on their device). The one float -> 8-bit conversion of the project."""
    if isinstance(image, torch.Tensor):
        return (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)


def from_uint8(image: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """uint8 image(s) -> float32 in [0, 1]; numpy stays numpy, tensors stay tensors. The inverse of `to_uint8`."""
    if isinstance(image, torch.Tensor):
        return image.float() / 255
    return np.asarray(image, dtype=np.float32) / 255


# --------------------------------------------------------------------------------- tensors


def _as_tensor(images: Any) -> torch.Tensor:
    """Tensor (channels first), numpy array (channels last), PIL image, or a (nested) list of
    them -> float32 tensor [..., 3, H, W] in [0, 1]."""
    if isinstance(images, torch.Tensor):
        tensor = from_uint8(images) if images.dtype == torch.uint8 else images.float()
        if tensor.ndim < 3 or tensor.shape[-3] not in (1, 3):
            raise Difix3DError(f"image tensors must be [..., 3, H, W], got {list(images.shape)}")
        return tensor.expand(*tensor.shape[:-3], 3, *tensor.shape[-2:]) if tensor.shape[-3] == 1 else tensor
    if isinstance(images, Image.Image):
        images = np.asarray(images.convert("RGB"))
    if isinstance(images, np.ndarray):
        if images.ndim <= 3:
            return torch.from_numpy(to_float_rgb(images)).permute(2, 0, 1)
        return torch.stack([_as_tensor(image) for image in images])
    if isinstance(images, (list, tuple)) and images:
        items = [_as_tensor(image) for image in images]
        if len({item.shape for item in items}) > 1:
            raise Difix3DError(f"images in one list must have the same size, got {[list(i.shape) for i in items]}")
        return torch.stack(items)
    raise Difix3DError(f"expected an image (tensor, numpy array, PIL image or a list of them), got {type(images).__name__}")


def _restorer(like: Any, single: bool) -> Callable[[torch.Tensor], Any]:
    """A function turning a float batch [B,3,H,W] in [0,1] back into the type of `like`."""
    if isinstance(like, (list, tuple)):
        item_restore = _restorer(like[0], single=True)
        return lambda batch: [item_restore(image[None]) for image in batch]
    if isinstance(like, torch.Tensor):

        def restore_tensor(batch: torch.Tensor) -> torch.Tensor:
            batch = batch.to(like.device)
            batch = to_uint8(batch) if like.dtype == torch.uint8 else batch.to(like.dtype)
            return batch[0] if single else batch

        return restore_tensor

    def restore_array(batch: torch.Tensor) -> Any:
        array = batch.permute(0, 2, 3, 1).cpu().numpy()
        dtype = np.uint8 if isinstance(like, Image.Image) else like.dtype
        if np.issubdtype(dtype, np.integer):
            array = (array * np.iinfo(dtype).max + 0.5).astype(dtype)
        else:
            array = array.astype(dtype)
        if isinstance(like, Image.Image):
            return Image.fromarray(array[0])
        return array[0] if single else array

    return restore_array


def to_batch(images: Any) -> tuple[torch.Tensor, Callable[[torch.Tensor], Any]]:
    """Images of any supported kind -> (float32 [B,3,H,W] in [0,1], a function that turns a
    result batch of the same size back into the input's kind, shape, dtype and device)."""
    tensor = _as_tensor(images)
    single = tensor.ndim == 3
    if single:
        tensor = tensor[None]
    if tensor.ndim != 4:
        raise Difix3DError(f"expected one image or a batch of images, got shape {list(tensor.shape)}")
    return tensor, _restorer(images, single)


def to_ref_batch(refs: Any, batch: torch.Tensor) -> torch.Tensor:
    """References for `batch` ([B,3,H,W]) -> [B,R,3,H,W], resized to the batch's H x W if needed.

    Accepted: one reference per image ([B,3,H,W] or a list of B images) or R per image
    ([B,R,3,H,W] or a list of B lists); for a single image also one image or R images.
    """
    tensor = _as_tensor(refs).to(batch.device)
    size = batch.shape[0]
    if tensor.ndim == 3:
        tensor = tensor[None, None]
    elif tensor.ndim == 4:
        tensor = tensor[:, None] if tensor.shape[0] == size else tensor[None]
    if tensor.ndim != 5 or tensor.shape[0] != size:
        raise Difix3DError(f"references of shape {list(tensor.shape)} do not fit {size} image(s)")
    if tensor.shape[-2:] != batch.shape[-2:]:
        flat = F.interpolate(tensor.flatten(0, 1), size=batch.shape[-2:], mode="bilinear", antialias=True)
        tensor = flat.unflatten(0, tensor.shape[:2]).clamp(0, 1)
    return tensor


def column_labels(width: int, labels: tuple[str, ...], height: int = 18) -> np.ndarray:
    """A white band with `labels` centred over equal-width columns, as uint8 RGB [height, width, 3]
    (to stack above an image grid)."""
    from PIL import ImageDraw

    band = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(band)
    column = width / len(labels)
    for index, label in enumerate(labels):
        left, top, right, bottom = draw.textbbox((0, 0), label)
        draw.text((index * column + (column - (right - left)) / 2, (height - (bottom - top)) / 2 - top), label, fill="black")
    return np.asarray(band)
