"""`difix3d fix` end to end with the tiny model: folders, odd formats, references, videos, errors."""

from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from difix3d.cli import main
from difix3d.errors import Difix3DError


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def renders(tmp_path):
    """Three renders in awkward formats: RGB 8-bit, RGBA, 16-bit grayscale; odd sizes."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "renders"
    folder.mkdir()
    iio.imwrite(folder / "frame_2.png", rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))
    iio.imwrite(folder / "frame_10.png", rng.integers(0, 256, (33, 21, 4), dtype=np.uint8))
    iio.imwrite(folder / "frame_1.png", rng.integers(0, 65536, (24, 30), dtype=np.uint16))
    return folder


def _fix(*args: str) -> None:
    main(["fix", "--device", "cpu", *args])  # the embedded Difix: trained, and small


def test_fix_folder_writes_every_image_at_its_size(renders, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    _fix("--input", str(renders), "--output", str(out))
    sizes = {path.name: iio.imread(path).shape for path in sorted(out.iterdir())}
    assert sizes == {"frame_1.png": (24, 30, 3), "frame_2.png": (40, 56, 3), "frame_10.png": (33, 21, 3)}
    assert "embedded default" in capsys.readouterr().out
    _fix("--input", str(renders), "--output", str(out))
    second = capsys.readouterr().out
    assert "wrote 0 image(s)" in second and "skipped 3" in second
    _fix("--input", str(renders), "--output", str(out), "--overwrite")
    assert "wrote 3 image(s)" in capsys.readouterr().out


def test_references_by_name_by_order_and_mismatch(renders, tmp_path, capsys) -> None:
    refs = tmp_path / "refs"
    refs.mkdir()
    for name in ("a", "b", "c"):  # no name matches: paired by order
        iio.imwrite(refs / f"{name}.png", np.full((16, 16, 3), 128, dtype=np.uint8))
    _fix("--input", str(renders), "--ref", str(refs), "--output", str(tmp_path / "out"))
    assert len(list((tmp_path / "out").iterdir())) == 3
    (refs / "c.png").unlink()
    with pytest.raises(SystemExit) as exit_info:
        _fix("--input", str(renders), "--ref", str(refs), "--output", str(tmp_path / "out2"))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("difix3d: error: cannot pair 3 input(s) with 2 reference(s)")


def test_bad_inputs_are_one_line_errors(tmp_path, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    for source, expected in ((empty, "no images in"), (broken, "cannot read image")):
        with pytest.raises(SystemExit):
            _fix("--input", str(source), "--output", str(tmp_path / "out"))
        assert expected in capsys.readouterr().err


def test_fix_video_frames(tmp_path) -> None:
    frames = np.random.default_rng(0).integers(0, 256, (3, 32, 48, 3), dtype=np.uint8)
    video = tmp_path / "render.mp4"
    iio.imwrite(video, frames, plugin="pyav", codec="libx264", fps=10)
    _fix("--input", str(video), "--output", str(tmp_path / "out"))
    written = sorted(path.name for path in (tmp_path / "out").iterdir())
    assert written == ["render_00000.png", "render_00001.png", "render_00002.png"]
    assert iio.imread(tmp_path / "out" / written[0]).shape == (32, 48, 3)


def _cli_error(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        _fix(*args)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("difix3d: error: ") and "\n" not in error, error
    return error


def test_fix_refuses_random_weights(renders, tmp_path, capsys) -> None:
    """Issue 14 case 2: `difix3d fix --model sd-turbo` wrote noise and exited 0."""
    import subprocess
    import sys

    # Once as a user runs it: the whole of stderr is the one line.
    difix3d = str(Path(sys.executable).parent / "difix3d")
    result = subprocess.run(
        [difix3d, "fix", "--input", str(renders), "--output", str(tmp_path / "sd-turbo"), "--model", "sd-turbo", "--device", "cpu"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("difix3d: error: ") and result.stderr.count("\n") == 1, result.stderr
    for model in ("tiny", "random-tiny-architecture"):
        _cli_error(capsys, "--input", str(renders), "--output", str(tmp_path / model), "--model", model)
    assert not any((tmp_path / model).exists() for model in ("sd-turbo", "tiny", "random-tiny-architecture"))
    from difix3d.models.checkpoint import load_difix

    with pytest.raises(Difix3DError, match="random-sd-turbo-architecture"):
        load_difix("sd-turbo")  # an architecture name never gives random weights by accident
    assert load_difix("random-tiny-architecture").config.architecture == "tiny"


def test_same_stem_inputs_are_refused(tmp_path, capsys) -> None:
    """Issue 14 case 3: a.png and a.jpg both became a.png and one was never fixed."""
    folder = tmp_path / "renders"
    folder.mkdir()
    iio.imwrite(folder / "a.png", np.zeros((16, 16, 3), dtype=np.uint8))
    iio.imwrite(folder / "a.jpg", np.zeros((16, 16, 3), dtype=np.uint8))
    error = _cli_error(capsys, "--input", str(folder), "--output", str(tmp_path / "out"))
    assert "a.jpg and a.png" in error and "a.png" in error
    assert not (tmp_path / "out").exists()


def test_output_never_replaces_inputs_or_references(renders, tmp_path, capsys) -> None:
    """Issue 14 case 3: --output equal to --input with --overwrite replaced the originals."""
    before = {path.name: path.read_bytes() for path in renders.iterdir()}
    error = _cli_error(capsys, "--input", str(renders), "--output", str(renders), "--overwrite")
    assert "would overwrite the input or reference images" in error
    for args in (
        ("--input", str(renders / "frame_2.png"), "--output", str(renders), "--overwrite"),
        ("--input", str(tmp_path / "renders" / "frame_2.png"), "--ref", str(renders), "--output", str(renders)),
    ):
        assert "would overwrite the input or reference images" in _cli_error(capsys, *args)
    assert {path.name: path.read_bytes() for path in renders.iterdir()} == before


def test_outputs_are_written_atomically(renders, tmp_path, monkeypatch, capsys) -> None:
    """Issue 14 case 3: a kill mid-write left a broken PNG that the next run skipped as done."""
    import os

    out = tmp_path / "out"
    real_replace = os.replace

    def killed_after_two(source, target):
        if len(list(out.glob("*.png"))) == 2:
            raise KeyboardInterrupt  # the third image is interrupted while being written
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", killed_after_two)
    with pytest.raises(SystemExit):
        _fix("--input", str(renders), "--output", str(out))
    monkeypatch.undo()
    assert sorted(path.name for path in out.iterdir()) == ["frame_1.png", "frame_2.png"]  # nothing partial, no temp file
    _fix("--input", str(renders), "--output", str(out))
    assert "wrote 1 image(s)" in capsys.readouterr().out
    assert all(iio.imread(path).ndim == 3 for path in out.iterdir())


def test_bad_release_checkpoint_never_suggests_unsafe_loading(tmp_path, capsys) -> None:
    """Issue 14 case 8: a random-bytes .pkl got torch's advice to load with weights_only=False."""
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    image = tmp_path / "a.png"
    iio.imwrite(image, np.zeros((16, 16, 3), dtype=np.uint8))
    error = _cli_error(capsys, "--input", str(image), "--output", str(tmp_path / "out"), "--model", str(bad))
    assert error.startswith(f"difix3d: error: cannot read release checkpoint {bad}")
    assert "weights_only" not in error, error
