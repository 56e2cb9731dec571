"""`difix3d fix` end to end with the tiny model: folders, odd formats, references, videos, errors."""

from __future__ import annotations

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from difix3d.cli import main


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
    main(["fix", "--model", "tiny", "--device", "cpu", *args])


def test_fix_folder_writes_every_image_at_its_size(renders, tmp_path, capsys, caplog) -> None:
    out = tmp_path / "out"
    _fix("--input", str(renders), "--output", str(out))
    sizes = {path.name: iio.imread(path).shape for path in sorted(out.iterdir())}
    assert sizes == {"frame_1.png": (24, 30, 3), "frame_2.png": (40, 56, 3), "frame_10.png": (33, 21, 3)}
    assert "RANDOM weights" in caplog.text
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
