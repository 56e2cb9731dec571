"""`ns-train difix3d-gs` and `ns-render` as child processes: the one command line and runner that the
demo, the quality benchmark and curation's nerfstudio reconstructor share.

The tools are the ones installed next to the running Python. Child processes keep each run's memory
(and nerfstudio's process-wide settings) out of the caller. `run_in_one_process` runs several of
them in one child (`python -m nerfstudio_plugin.runner`), one after another, for callers that train
and then render: a nerfstudio command spends about 13 s of CPU importing and starting before it
does anything, most of a short run's cost.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from difix3d.errors import Difix3DError

BIN = Path(sys.executable).parent
METHOD = "difix3d-gs"
NEVER = 1_000_000_000  # an interval nerfstudio never reaches
TIMESTAMP = "run"  # a fixed run folder name instead of nerfstudio's date


def run_dir(output_dir: Path, experiment_name: str) -> Path:
    """The folder of a `train_command` run (config.yml, nerfstudio_models/, difix3d/)."""
    return Path(output_dir) / experiment_name / METHOD / TIMESTAMP


def train_command(
    data: Path,
    output_dir: Path,
    experiment_name: str,
    steps: int,
    *extra: str | Path | int | float,
    device: str = "cpu",
    seed: int | None = None,
    save_every: int | None = None,
    keep_checkpoints: bool = False,
    eval_loss: bool = True,
    dataparser: Sequence[str | Path | int] = (),
) -> list[str]:
    """`ns-train difix3d-gs` for `steps` steps into `run_dir(output_dir, experiment_name)`: no
    evaluation images, tensorboard logs, full resolution from the start (Splatfacto starts at 1/4).

    `extra`: more method flags (e.g. `--pipeline.difix.enabled False`); `seed`: nerfstudio's seed and
    the camera-order seed; `save_every`: checkpoint interval (default: at the end only), all of them
    kept with `keep_checkpoints`; `eval_loss=False`: skip the evaluation-batch loss too;
    `dataparser`: a dataparser subcommand and its flags, last on the line (e.g. `colmap ...`).
    """
    seeding = ["--machine.seed", seed, "--pipeline.datamanager.train-cameras-sampling-seed", seed] if seed is not None else []
    saving = ["--steps-per-save", save_every] if save_every else []
    keeping = ["--save-only-latest-checkpoint", "False"] if keep_checkpoints else []
    evaluation = [] if eval_loss else ["--steps-per-eval-batch", 0]
    command = [
        BIN / "ns-train", METHOD, "--data", data, "--output-dir", output_dir, "--experiment-name", experiment_name,
        "--timestamp", TIMESTAMP, "--machine.device-type", device, *seeding, "--vis", "tensorboard",
        "--max-num-iterations", steps, *saving, *keeping,
        "--steps-per-eval-image", NEVER, "--steps-per-eval-all-images", NEVER, *evaluation,
        "--pipeline.model.num-downscales", 0, *extra, *dataparser,
    ]  # fmt: skip
    return [str(part) for part in command]


def render_command(config: Path, split: str, outputs: Sequence[str], output_path: Path, image_format: str | None = "png") -> list[str]:
    """`ns-render dataset`: the `outputs` (e.g. rgb, rgb_enhanced) of a split's views, into
    `output_path/<split>/<output>/`; `image_format` None: nerfstudio's default (jpeg)."""
    formatting = ["--image-format", image_format] if image_format else []
    command = [BIN / "ns-render", "dataset", "--load-config", config, "--split", split,
               "--rendered-output-names", *outputs, *formatting, "--output-path", output_path]  # fmt: skip
    return [str(part) for part in command]


def run(
    command: Sequence[str], log_file: Path | None = None, env: Mapping[str, str] | None = None, echo: bool = False, name: str | None = None
) -> float:
    """Run a nerfstudio tool to completion; returns its CPU seconds (user + system).

    Its output goes to `log_file` (None: this process's terminal); its input is closed (nerfstudio
    would otherwise wait for answers to its prompts). The environment is this one plus `env`, with
    the Hugging Face hub offline unless set otherwise. A failure raises `Difix3DError` naming the
    tool (`name`, else the command's program), its exit status, the log and the log's last line.
    """
    command = [str(part) for part in command]
    if echo:
        print("$ " + " ".join(command), flush=True)
    environment = {"HF_HUB_OFFLINE": "1", **os.environ, **(env or {})}
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w") if log_file is not None else contextlib.nullcontext() as output:
        stderr = subprocess.STDOUT if output is not None else None
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, env=environment, stdout=output, stderr=stderr)
        try:
            _, status, usage = os.wait4(process.pid, 0)  # wait, with the child's own CPU time
        except BaseException:
            process.kill()
            process.wait()
            raise
    returncode = os.waitstatus_to_exitcode(status)
    if returncode != 0:
        tool = name or Path(command[0]).name
        if log_file is None:
            raise Difix3DError(f"{tool} failed (exit {returncode}); its output is above")
        lines = log_file.read_text(errors="replace").strip().splitlines()
        raise Difix3DError(f"{tool} failed (exit {returncode}; log {log_file}): {lines[-1] if lines else ''}")
    return usage.ru_utime + usage.ru_stime


def run_in_one_process(commands: Sequence[Sequence[str]], log_file: Path | None = None, env: Mapping[str, str] | None = None) -> float:
    """`run` for several `train_command` / `render_command` lines, one after another in one child
    process (a failure stops the rest); returns its CPU seconds."""
    lines = [[str(part) for part in command] for command in commands]
    unknown = sorted({Path(line[0]).name for line in lines} - set(_ENTRYPOINTS))
    if unknown:
        raise Difix3DError(f"run_in_one_process runs {' and '.join(_ENTRYPOINTS)} only, not {unknown[0]}")
    name = " then ".join(Path(line[0]).name for line in lines)
    return run([sys.executable, "-m", __name__, json.dumps(lines)], log_file=log_file, env=env, name=name)


_ENTRYPOINTS = {"ns-train": "nerfstudio.scripts.train", "ns-render": "nerfstudio.scripts.render"}


def _run_here(lines: list[list[str]]) -> None:
    """The child of `run_in_one_process`: each tool's own entry point, with its command line in sys.argv."""
    import importlib

    for line in lines:
        tool = Path(line[0]).name
        sys.argv = [tool, *line[1:]]
        importlib.import_module(_ENTRYPOINTS[tool]).entrypoint()


if __name__ == "__main__":
    _run_here(json.loads(sys.argv[1]))
