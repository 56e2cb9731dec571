"""Shared fixtures: scenes are built once per test session and reused by every test file."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_scene(tmp_path_factory) -> Path:
    """The default procedural scene (seed 0, 12 train + 8 eval views at 160x120) with its real
    pycolmap SfM model: `images/`, `sparse/0/`, `ground_truth.json`. Treat it as read-only."""
    from difix3d.scenes import build_scene

    scene_dir = tmp_path_factory.mktemp("tiny_scene") / "scene"
    build_scene(scene_dir, seed=0, log=lambda message: None)
    return scene_dir
