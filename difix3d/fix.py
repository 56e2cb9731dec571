"""`difix3d fix`: clean rendered images (a file, a folder or a video) with Difix."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

from difix3d.devices import DtypeName, resolve_device, resolve_dtype
from difix3d.errors import Difix3DError
from difix3d.images import IMAGE_SUFFIXES, is_video, list_images, load_image, read_video, save_image
from difix3d.models.ids import DEFAULT_BASE, EMBEDDED_DIFIX, random_weights_architecture

logger = logging.getLogger(__name__)

Frame = tuple[str, Callable[[], np.ndarray]]  # output name (no suffix), loader


def fix_command(
    input: Path,  # noqa: A002 - the flag is --input
    output: Path,
    ref: Path | None = None,
    model: str = EMBEDDED_DIFIX,
    base: str = DEFAULT_BASE,
    device: str = "auto",
    dtype: DtypeName = "auto",
    overwrite: bool = False,
) -> None:
    """Fix rendered images with Difix and write them as PNG to OUTPUT.

    Args:
        input: An image, a folder of images or a video.
        output: Folder for the fixed images (named after the inputs; video frames as NAME_00000.png).
        ref: Optional reference image, or a folder paired with the inputs by file name, else by order
            (ignored, with a warning, by a model trained without references such as nvidia/difix).
        model: Hub id (e.g. nvidia/difix_ref), difix3d or diffusers folder, or release .pkl; default: the
            embedded small Difix trained on procedural scenes.
        base: SD-Turbo base (hub id or folder) that a release .pkl is applied to.
        device: "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...
        dtype: "auto" is bfloat16 on CUDA and float32 on CPU.
        overwrite: Redo images whose output already exists (they are skipped otherwise).
    """
    if random_weights_architecture(model) is not None:
        raise Difix3DError(
            f"--model {model} has random weights and would write noise; fix with a trained Difix "
            "(the default embedded one, nvidia/difix_ref for photographs, or your own difix3d train output)"
        )
    count, frames, names = _input_frames(input)
    _refuse_overwriting_sources(output, input, ref, names)
    reference_for = _reference_lookup(ref, names)
    torch_device = resolve_device(device)
    from difix3d.models.checkpoint import load_difix  # diffusers: imported once the inputs are known to be good

    difix = load_difix(model, device=torch_device, dtype=resolve_dtype(dtype, torch_device), base=base)
    embedded = " (embedded default: a small Difix trained on procedural scenes on the CPU; --model nvidia/difix_ref for photographs)"
    print(f"Difix model: {model}" + (embedded if model == EMBEDDED_DIFIX else ""))
    written = skipped = 0
    for index, (name, load) in enumerate(tqdm(frames, total=count, desc="difix3d fix", unit="image")):
        target = output / f"{name}.png"
        if target.exists() and not overwrite:
            skipped += 1
            continue
        save_image(target, difix.fix(load(), reference_for(index, name)))
        written += 1
    note = f"; skipped {skipped} already written (--overwrite redoes them)" if skipped else ""
    print(f"wrote {written} image(s) to {output}{note}")


def _input_frames(path: Path) -> tuple[int | None, Iterator[Frame], list[str] | None]:
    """(count or None for videos, frames, names for pairing by name or None)."""
    if path.is_dir():
        files = list_images(path)
        if not files:
            raise Difix3DError(f"no images in {path} (looked for {', '.join(IMAGE_SUFFIXES)})")
        by_stem: dict[str, list[str]] = {}
        for file in files:
            by_stem.setdefault(file.stem, []).append(file.name)
        clashes = [names for names in by_stem.values() if len(names) > 1]
        if clashes:
            raise Difix3DError(
                f"{' and '.join(clashes[0])} in {path} would both be written as {Path(clashes[0][0]).stem}.png: "
                "rename one of them (or fix them from separate folders)"
            )
        return len(files), ((file.stem, partial(load_image, file)) for file in files), [f.stem for f in files]
    if not path.is_file():
        raise Difix3DError(f"input {path} does not exist")
    if is_video(path):
        frames = ((f"{path.stem}_{i:05d}", partial(np.asarray, frame)) for i, frame in enumerate(read_video(path)))
        return None, frames, None
    return 1, iter([(path.stem, partial(load_image, path))]), [path.stem]


def _refuse_overwriting_sources(output: Path, input: Path, ref: Path | None, names: list[str] | None) -> None:  # noqa: A002
    """Fixed images never replace the inputs or the references (not even with --overwrite)."""
    if output.exists() and not output.is_dir():
        raise Difix3DError(f"--output {output} is a file; give a folder for the fixed images")
    sources = [path for path in (input, ref) if path is not None]
    folders = {path.resolve() for path in sources if path.is_dir()}
    files = {path.resolve() for path in sources if path.is_file()}
    targets = {(output / f"{name}.png").resolve() for name in names or []}
    if output.resolve() in folders or targets & files:
        raise Difix3DError(
            f"--output {output} would overwrite the input or reference images; choose another folder"
        )


def _reference_lookup(ref: Path | None, names: list[str] | None) -> Callable[[int, str], np.ndarray | None]:
    """A function (input index, input name) -> the reference image for it (or None)."""
    if ref is None:
        return lambda index, name: None
    if ref.is_file():
        image = load_image(ref)
        return lambda index, name: image
    if not ref.is_dir():
        raise Difix3DError(f"reference {ref} does not exist")
    files = list_images(ref)
    if not files:
        raise Difix3DError(f"no images in reference folder {ref}")
    by_name = {file.stem: file for file in files}
    if names is not None and all(name in by_name for name in names):
        return lambda index, name: load_image(by_name[name])
    if names is not None and len(files) != len(names):
        raise Difix3DError(
            f"cannot pair {len(names)} input(s) with {len(files)} reference(s) in {ref}: "
            "names do not match and counts differ"
        )

    def by_order(index: int, name: str) -> np.ndarray:
        if index >= len(files):
            raise Difix3DError(f"{ref} has {len(files)} references, fewer than the input frames")
        return load_image(files[index])

    return by_order
