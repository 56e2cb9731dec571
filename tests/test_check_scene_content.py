"""scripts/check_scene_content.py at toy size: one materials scene, a 3-step 3DGS fit (its numbers mean nothing)."""

from __future__ import annotations

import json

import imageio.v3 as iio
import pytest

from script_modules import load_script


@pytest.mark.slow  # a whole scene with SfM
def test_reports_registration_and_fit_and_reuses_finished_scenes(tmp_path):
    script = load_script("check_scene_content")
    settings = script.CheckSceneContent(work=tmp_path / "work", out=tmp_path / "out", contents=["materials"], seeds=[1003], steps=3)
    (result,) = script.main(settings)
    assert (result["content"], result["seed"], result["registered"], result["views"]) == ("materials", 1003, 20, 20)
    assert result["points3d"] > 100 and 0 < result["train_psnr"] < 60
    assert json.loads((tmp_path / "out" / "scene_content.json").read_text()) == [result]
    assert "| materials | 1003 | 20 / 20 |" in (tmp_path / "out" / "scene_content.md").read_text()
    assert iio.imread(tmp_path / "out" / "scene_content.png").shape == (18 + 120, 4 * 160, 3)  # labels, one row

    kept = tmp_path / "work" / "materials_1003" / "result.json"
    written = kept.stat().st_mtime_ns
    assert script.main(settings) == [result] and kept.stat().st_mtime_ns == written
