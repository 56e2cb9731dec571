"""Process-wide settings (threads, glibc heap, pycolmap's log level) belong to entry points."""

from __future__ import annotations

import re
from pathlib import Path

import pycolmap
import pytest
import torch

import difix3d
from difix3d.data.sfm import _colmap_min_log_level
from difix3d.runtime import configure_cpu_runtime

PROCESS_WIDE_CALLS = re.compile(r"set_num_threads\(|set_num_interop_threads\(|mallopt\(|minloglevel\s*=")


def test_only_runtime_module_changes_threads_or_allocator():
    library = Path(difix3d.__file__).parent
    offenders = [
        f"{path.relative_to(library).as_posix()}:{number}"
        for path in sorted(library.rglob("*.py"))
        if path.relative_to(library).as_posix() not in ("runtime.py", "data/sfm.py")  # sfm: only inside its restoring context manager
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if PROCESS_WIDE_CALLS.search(line)
    ]
    assert offenders == []


def test_configure_cpu_runtime_sets_threads_or_keeps_the_default():
    threads = torch.get_num_threads()
    try:
        configure_cpu_runtime(2)
        assert torch.get_num_threads() == 2
        configure_cpu_runtime(None)
        configure_cpu_runtime(0)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_scene_render_and_rasterization_leave_threads_alone():
    from difix3d.data.scenes import Intrinsics, ProceduralScene
    from difix3d.rendering.rasterize import rasterization_torch

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        pose = [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1.5], [0, 0, 0, 1]]
        ProceduralScene.from_seed(0).render(pose, Intrinsics(8, 6, 6.0, 6.0, 4.0, 3.0), supersample=1)
        n = 16
        rasterization_torch(
            torch.randn(n, 3) * 0.1 + torch.tensor([0, 0, 3.0]), torch.randn(n, 4), torch.full((n, 3), 0.05),
            torch.rand(n), torch.rand(n, 3), torch.eye(4)[None],
            torch.tensor([[8.0, 0, 4], [0, 8.0, 3], [0, 0, 1]])[None], 8, 6,
        )
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_colmap_log_level_is_restored_even_on_failure():
    before = pycolmap.logging.minloglevel
    with pytest.raises(RuntimeError):
        with _colmap_min_log_level(before + 1):
            assert pycolmap.logging.minloglevel == before + 1
            raise RuntimeError
    assert pycolmap.logging.minloglevel == before


def test_ns_train_methods_set_cpu_threads_in_their_trainer_not_the_pipeline(monkeypatch, tmp_path):
    import copy

    from nerfstudio.engine.trainer import Trainer

    from nerfstudio_plugin.config import difix3d_gs, difix3d_nerfacto

    monkeypatch.setattr(Trainer, "setup", lambda self, test_mode="val": None)  # no pipeline: threads only
    threads = torch.get_num_threads()
    try:
        for method in (difix3d_gs, difix3d_nerfacto):
            torch.set_num_threads(1)
            config = copy.deepcopy(method.config)
            config.machine.device_type, config.output_dir, config.cpu_threads = "cpu", tmp_path, 2
            config.setup().setup()
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_device_name_names_the_cpu():
    from difix3d.devices import device_name

    name = device_name("cpu")
    assert isinstance(name, str) and name.strip() == name and name
