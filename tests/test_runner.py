"""nerfstudio_plugin.runner: several nerfstudio commands in one child process (the benchmark's
train-then-render; its real run is in tests/test_bench_quality.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from difix3d.errors import Difix3DError
from nerfstudio_plugin import runner


def test_one_process_runs_each_tool_in_order_and_names_them(monkeypatch, tmp_path):
    launched = {}
    monkeypatch.setattr(runner, "run", lambda command, **kwargs: launched.update(command=command, **kwargs) or 1.5)
    train = runner.train_command(Path("scene"), tmp_path, "x", 3)
    render = runner.render_command(tmp_path / "config.yml", "test", ["rgb"], tmp_path / "renders")
    assert runner.run_in_one_process([train, render], log_file=tmp_path / "log") == 1.5
    command = launched["command"]
    assert command[:3] == [sys.executable, "-m", "nerfstudio_plugin.runner"] and launched["name"] == "ns-train then ns-render"
    assert json.loads(command[3]) == [train, render]

    # The child: each tool's own entry point, with its command line as sys.argv.
    calls = []
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    for module in runner._ENTRYPOINTS.values():
        monkeypatch.setitem(sys.modules, module, SimpleNamespace(entrypoint=lambda: calls.append(list(sys.argv))))
    runner._run_here(json.loads(command[3]))
    assert calls == [["ns-train", *train[1:]], ["ns-render", *render[1:]]]

    with pytest.raises(Difix3DError, match="not ns-eval"):
        runner.run_in_one_process([train, [str(runner.BIN / "ns-eval"), "--load-config", "c.yml"]])
