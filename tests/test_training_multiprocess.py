"""`difix3d train` with several processes: data sharding, RNG states in checkpoints, and two real
CPU processes (gloo) launched as the README says, resumed bit for bit."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_training import _write_pair

from difix3d.training.finetune import CropDataset, Pair, StreamSampler, _rng_state, _set_rng_state

CHECKPOINT_FILES = ["ema.safetensors", "optimizer.pt", "rng_states.json", "state.json", "trainable.safetensors"]


def _positions(process_index: int, num_processes: int, batch_size: int, steps: int) -> list[int]:
    sampler = iter(StreamSampler(0, batch_size, process_index, num_processes))
    return [next(sampler) for _ in range(steps * batch_size)]


@pytest.mark.parametrize("num_pairs, num_processes, batch_size", [(5, 2, 1), (12, 3, 2), (7, 4, 3)])
def test_processes_share_each_epoch_without_repeating_a_pair(num_pairs, num_processes, batch_size):
    pairs = [Pair(f"p{i}", Path(f"{i}.png"), Path("t.png"), None, None, (8, 8)) for i in range(num_pairs)]
    dataset = CropDataset(pairs, (8, 8), seed=3)
    steps = 3 * num_pairs
    positions = [p for rank in range(num_processes) for p in _positions(rank, num_processes, batch_size, steps)]
    assert sorted(positions) == list(range(steps * num_processes * batch_size))  # disjoint, no gaps
    for epoch in range(len(positions) // num_pairs):
        seen = [dataset._pair_at(p).id for p in range(epoch * num_pairs, (epoch + 1) * num_pairs)]
        assert sorted(seen) == sorted(p.id for p in pairs)


def test_rng_states_round_trip_through_json():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.normal()  # cached Gaussians are part of the state
    saved = json.loads(json.dumps(_rng_state()))
    expected = (random.random(), random.gauss(0, 1), np.random.normal(size=3), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    _set_rng_state(saved, torch.device("cpu"))
    replay = (random.random(), random.gauss(0, 1), np.random.normal(size=3), torch.rand(3))
    assert replay[:2] == expected[:2] and np.array_equal(replay[2], expected[2]) and torch.equal(replay[3], expected[3])


# ------------------------------------------------------------------------ two CPU processes


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _train_args(dataset: Path, output: Path, *extra: str) -> list[str]:
    return [
        "-m", "difix3d.cli", "train", "--dataset", str(dataset), "--output", str(output), "--model", "random-tiny-architecture",
        "--perceptual-backbone", "random", "--steps", "6", "--crop-size", "24", "--learning-rate", "1e-4",
        "--gram-warmup-steps", "2", "--checkpoint-every", "3", "--eval-every", "6", "--log-every", "1", *extra,
    ]  # fmt: skip


def _launch(command: list[str]) -> subprocess.Popen:
    # A session of its own, so that cleaning up also ends the workers a launcher started.
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(processes: list[subprocess.Popen]) -> str:
    try:
        outputs = [process.communicate(timeout=900)[0] for process in processes]
    finally:
        for process in processes:  # none is left behind when one hangs or fails
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    assert [process.returncode for process in processes] == [0] * len(processes), "\n".join(outputs)
    return "".join(outputs)


def _losses(output: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(output / "tensorboard"))
    events.Reload()
    return {event.step: event.value for event in events.Scalars("loss/total")}


@pytest.mark.slow
def test_two_processes_train_checkpoint_once_and_resume_exactly(tmp_path):
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    content = {"train": {f"p{i}": _write_pair(pairs, i) for i in range(4)}, "test": {"t0": _write_pair(pairs, 9)}}
    (pairs / "data.json").write_text(json.dumps(content))
    dataset = pairs / "data.json"

    # The README's recipe for CPU processes.
    full = tmp_path / "full"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port())]
    log = _finish([_launch([*torchrun, *_train_args(dataset, full, "--ema-decay", "0.5")])])

    assert sorted(p.name for p in (full / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]
    for checkpoint in (full / "checkpoints").iterdir():
        assert sorted(p.name for p in checkpoint.iterdir()) == CHECKPOINT_FILES
    rng = json.loads((full / "checkpoints" / "step-00000003" / "rng_states.json").read_text())["processes"]
    assert len(rng) == 2 and rng[0]["torch"] != rng[1]["torch"]  # each process's own state
    assert [p.relative_to(full).as_posix() for p in full.rglob("README.md")] == ["README.md"]
    card = (full / "README.md").read_text()
    assert "**Processes**: 2; effective batch size 2 pairs per step" in card
    assert "moving average of the trained weights, decay 0.5" in card
    assert sorted(p.name for p in (full / "eval").iterdir()) == ["metrics.jsonl", "step-00000006.png"]
    assert len((full / "eval" / "metrics.jsonl").read_text().splitlines()) == 1
    assert len(list((full / "tensorboard").iterdir())) == 1
    # One process talks: one set of log lines.
    assert log.count("checkpoint written") == 2 and log.count("PERCEPTUAL BACKBONE IS RANDOM") == 1
    uninterrupted = _losses(full)
    assert sorted(uninterrupted) == [1, 2, 3, 4, 5, 6]

    # Resume from step 3 in a fresh folder, launched as two one-process "nodes" (the multi-node recipe).
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoints" / "step-00000003", resumed / "checkpoints" / "step-00000003")
    port = str(_free_port())
    nodes = [
        _launch([
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
            "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
            "--main_process_port", port, *_train_args(dataset, resumed, "--resume", "--ema-decay", "0.5"),
        ])  # fmt: skip
        for rank in range(2)
    ]
    _finish(nodes)
    assert _losses(resumed) == {step: uninterrupted[step] for step in (4, 5, 6)}
    # The moving average resumes with the run: the saved models are the same.
    from safetensors.torch import load_file

    saved, saved_resumed = (load_file(folder / "model.safetensors") for folder in (full, resumed))
    assert all(torch.equal(saved[name], saved_resumed[name]) for name in saved)
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]
