"""The GPU check's parts, run by `scripts/gpu_check.sh` (which installs the carried wheels first).

Parts, in order of value, each a subprocess under its own time cap, all inside one budget
(--budget-s, counted from the shell script's start, wheel install included):

1. cuda_tests: the CUDA-marked tests (`pytest -m cuda` on the test files that use the marker);
2. difix_latency: `scripts/bench_difix.py`, sd-turbo architecture with random weights, bf16,
   576x1024 and 1080x1920, one reference and none (targets: 35 ms and 150 ms with one reference);
3. difix_latency_compiled: the same under torch.compile (each shape compiles once; compile time
   reported per configuration);
4. train_memory, train_memory_no_checkpointing: `scripts/bench_train_memory.py`, sd-turbo at
   512x512, bf16, batch 1, gradient checkpointing on, then off (target: peak <= 20 GiB);
5. rasterizer: `scripts/bench_rasterize.py --device cuda --quick`: gsplat against the PyTorch path
   (image difference and speed ratio).

gsplat 1.4.0 (nerfstudio's pin) is a pure-Python wheel that carries its CUDA sources: on first use
`gsplat.cuda._backend` compiles them (25 .cu/.cpp files, torch.utils.cpp_extension.load: nvcc and
ninja, MAX_JOBS at a time, for TORCH_CUDA_ARCH_LIST) into TORCH_EXTENSIONS_DIR/gsplat_cuda, and
later processes load that build; an unfinished build is thrown away and started again. One of the
files (rasterize_to_pixels_fwd.cu) compiled cleanly with nvcc 13.0, C++20 and torch 2.14's headers
for sm_90 on this project's CPU machine, taking 4 CPU-minutes: the whole build may take minutes on
the GPU machine too. So it starts in the background at once (CPU work) while the GPU parts that do
not need it run; the parts that need it (1 and 5) run as soon as it has finished, and are skipped,
with the build's progress recorded (objects compiled), if it cannot finish in time. Each part's
`started_s` shows what ran beside the build.

Everything lands in `$OUT/gpu_check.json` (rewritten atomically after every part, so a run cut
short keeps what it finished) and every part's output in `$OUT/gpu_check.log`.
`--dry-run` runs the same plumbing on the CPU with tiny settings (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import signal
import subprocess
import sys
import shutil
import tempfile
import threading
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("torch", "triton", "diffusers", "transformers", "peft", "accelerate", "huggingface-hub", "safetensors",
            "gsplat", "tyro", "lpips", "numpy")
BUDGET_S = 480.0  # the 8 minutes, out of a 15-minute lease (machine start and transfers aside)
GSPLAT_BUILD_CAP_S = 330.0
GSPLAT_PARTS_RESERVE_S = 75.0  # the build is given up when less than this would be left for its parts
MIN_PART_S = 15.0  # a part is skipped rather than started with less time than this
TAIL_CHARS = 1500


@dataclass
class Part:
    name: str
    command: list[str]
    cap_s: float
    parse: Callable[[str], object]
    needs_gsplat: bool = False
    skip_reason: str | None = None


@dataclass
class Run:
    """A started subprocess whose output goes to a file; killed with its whole process group."""

    name: str
    command: list[str]
    output: Path
    env: dict
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        with self.output.open("w") as stream:
            self.process = subprocess.Popen(
                self.command, stdout=stream, stderr=subprocess.STDOUT, cwd=ROOT, env=self.env, start_new_session=True
            )
        self.ended: float | None = None
        threading.Thread(target=self._note_end, daemon=True).start()  # the real duration, whenever it is read

    def _note_end(self) -> None:
        self.process.wait()
        self.ended = time.monotonic()

    def wait(self, seconds: float) -> int | None:
        try:
            return self.process.wait(timeout=max(seconds, 0.0))
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    @property
    def seconds(self) -> float:
        return round((self.ended or time.monotonic()) - self.started, 1)

    def text(self) -> str:
        return self.output.read_text(errors="replace")


# ------------------------------------------------------------------------------------ parsers


def json_lines(text: str) -> list[dict]:
    """Every line that is a JSON object on its own (bench_difix prints one per configuration)."""
    rows = []
    for line in text.splitlines():
        if line.startswith("{") and line.endswith("}"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


def last_json_object(text: str) -> dict | None:
    """The last pretty-printed JSON object of the output (the benchmarks end with one)."""
    start = text.rfind("\n{\n") + 1
    if start == 0 and not text.startswith("{\n"):
        return None
    try:
        return json.JSONDecoder().raw_decode(text[start:])[0]
    except json.JSONDecodeError:
        return None


def junit_results(path: Path) -> Callable[[str], dict]:
    def parse(text: str) -> dict:
        if not path.is_file():
            return {"summary": text.strip().splitlines()[-1] if text.strip() else ""}
        cases = {}
        for case in ElementTree.parse(path).iter("testcase"):
            outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
            cases[f"{case.get('classname')}::{case.get('name')}"] = {"outcome": outcome, "seconds": float(case.get("time", 0))}
        counts: dict[str, int] = {}
        for case in cases.values():
            counts[case["outcome"]] = counts.get(case["outcome"], 0) + 1
        return {"counts": counts, "tests": cases}

    return parse


# ------------------------------------------------------------------------------------ the parts


def make_parts(dry_run: bool, scratch: Path) -> list[Part]:
    python = sys.executable
    cuda_test_files = sorted(
        str(path.relative_to(ROOT)) for path in (ROOT / "tests").glob("test_*.py") if "pytest.mark.cuda" in path.read_text()
    )
    junit = scratch / "junit.xml"
    if dry_run:  # tiny model, tiny sizes, CPU: the plumbing, in seconds
        latency = ["--device", "cpu", "--models", "tiny", "--sizes", "64x64", "--dtypes", "float32", "--warmup", "0", "--repeats", "1"]
        train = ["--model", "tiny", "--size", "32", "--steps", "1", "--mixed-precision", "no"]
        raster = ["--device", "cpu", "--quick", "--repeats", "1"]
        caps = dict(tests=120, latency=120, compiled=0, train=120, raster=120)
    else:
        latency = ["--device", "cuda", "--models", "sd-turbo", "--sizes", "576x1024", "1080x1920", "--dtypes", "bfloat16",
                   "--warmup", "2", "--repeats", "10"]
        train = ["--model", "sd-turbo", "--size", "512", "--steps", "3", "--mixed-precision", "bf16"]
        raster = ["--device", "cuda", "--quick"]
        caps = dict(tests=90, latency=100, compiled=150, train=90, raster=75)
    return [
        Part("cuda_tests", [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", f"--junitxml={junit}",
                            *cuda_test_files], caps["tests"], junit_results(junit), needs_gsplat=True),
        Part("difix_latency", [python, "scripts/bench_difix.py", *latency, "--refs", "1", "0", "--no-naive"],
             caps["latency"], json_lines),
        Part("difix_latency_compiled", [python, "scripts/bench_difix.py", *latency, "--refs", "1", "0", "--no-naive",
                                        "--compile", "True"], caps["compiled"], json_lines,
             skip_reason="dry run: torch.compile takes many minutes on a small CPU, even for the tiny model" if dry_run else None),
        Part("train_memory", [python, "scripts/bench_train_memory.py", *train], caps["train"], last_json_object),
        Part("train_memory_no_checkpointing", [python, "scripts/bench_train_memory.py", *train, "--no-gradient-checkpointing"],
             caps["train"], last_json_object),
        Part("rasterizer", [python, "scripts/bench_rasterize.py", *raster], caps["raster"], last_json_object, needs_gsplat=True),
    ]


def gsplat_build_command(dry_run: bool) -> list[str]:
    if dry_run:  # no nvcc build on a CPU: importing gsplat stands in for it
        return [sys.executable, "-c", "import gsplat; print('gsplat', gsplat.__version__)"]
    return [sys.executable, "-c", "from gsplat.cuda._backend import _C; assert _C is not None, 'gsplat built no CUDA backend'; print('gsplat CUDA backend built')"]


# ------------------------------------------------------------------------------------ the report


def environment(dry_run: bool) -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    device: dict = {"name": platform.processor() or "cpu"} if dry_run else {}
    if not dry_run:
        query = "name,driver_version,memory.total,compute_cap"
        try:
            line = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                                  text=True, timeout=30).stdout.strip().splitlines()[0]
            device = dict(zip(query.split(","), (value.strip() for value in line.split(","))))
        except (OSError, IndexError, subprocess.TimeoutExpired) as error:
            device = {"error": str(error)}
    try:
        import torch

        versions["torch_cuda"] = torch.version.cuda
    except ImportError:
        pass
    try:  # the GPU machine gets a copy of the working tree, perhaps without git or .git
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    return {"device": device, "python": platform.python_version(), "versions": versions, "commit": commit or None}


def targets(parts: dict) -> list[dict]:
    """The project's promised GPU figures next to what was measured."""
    found = []
    for name in ("difix_latency", "difix_latency_compiled"):
        for row in (parts.get(name, {}).get("results") or []):
            if isinstance(row, dict) and "target_ms" in row:
                found.append({
                    "what": f"Difix {row['model']} {row['height']}x{row['width']} {row['dtype']}, {row['refs']} reference"
                            + (", torch.compile" if row.get("compiled") else ""),
                    "target": f"<= {row['target_ms']} ms", "measured": f"{row['ours_ms']} ms", "met": row["meets_target"],
                })
    for name in ("train_memory", "train_memory_no_checkpointing"):
        report = parts.get(name, {}).get("results")
        if isinstance(report, dict) and "target_gib" in report:
            found.append({
                "what": f"fine-tuning {report['model']} {report['size']}x{report['size']} {report['mixed_precision']}, "
                        f"gradient checkpointing {'on' if report['gradient_checkpointing'] else 'off'}",
                "target": f"<= {report['target_gib']} GiB", "measured": f"{report['peak_allocated_gib']} GiB",
                "met": report["within_target"],
            })
    return found


def write_json(path: Path, report: dict) -> None:
    report["targets"] = targets(report["parts"])
    report["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(temporary, path)


# ------------------------------------------------------------------------------------ running


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny settings: check the plumbing")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="all parts together, from the script's start")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "gpu_check_out")))
    args = parser.parse_args()
    started = float(os.environ.get("GPU_CHECK_STARTED", time.time()))
    deadline = time.monotonic() + args.budget_s - (time.time() - started)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path, log_path = args.out / "gpu_check.json", args.out / "gpu_check.log"
    scratch = Path(tempfile.mkdtemp(prefix="difix3d-gpu-check-"))
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # gsplat's build, shared by every part; outside the scratch folder so that a rerun on the
        # still-warm machine loads a finished build instead of compiling again.
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(Path(tempfile.gettempdir()) / "difix3d-torch-extensions")),
        "MAX_JOBS": os.environ.get("MAX_JOBS", "12"),  # parallel nvcc jobs; the GPU parts keep the other cores
    }
    report = {
        "check": "scripts/gpu_check.sh" + (" --dry-run" if args.dry_run else ""),
        "started": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
        "budget_s": args.budget_s,
        "wheels_installed": int(os.environ.get("GPU_CHECK_WHEELS", 0)),
        "setup_seconds": round(time.time() - started, 1),
        **environment(args.dry_run),
        "gsplat_build": {},
        "parts": {},
    }
    if not args.dry_run and report["device"].get("compute_cap"):
        env.setdefault("TORCH_CUDA_ARCH_LIST", report["device"]["compute_cap"])  # build for this GPU only
    write_json(json_path, report)

    build = Run("gsplat_build", gsplat_build_command(args.dry_run), scratch / "gsplat_build.out", env)
    build_deadline = min(build.started + GSPLAT_BUILD_CAP_S, deadline - GSPLAT_PARTS_RESERVE_S)
    build_status: str | None = None

    def note_build(status: str) -> None:
        report["gsplat_build"] = {
            "status": status, "seconds": build.seconds, "cap_s": round(build_deadline - build.started, 1),
            "objects_compiled": len(list(Path(env["TORCH_EXTENSIONS_DIR"]).rglob("*.o"))),
            "output_tail": build.text()[-TAIL_CHARS:],
        }

    def finish_build(wait_s: float) -> str | None:
        """Wait up to `wait_s` for the build; record and return its status once it has one."""
        nonlocal build_status
        if build_status is None:
            returncode = build.wait(wait_s)
            if returncode is None and time.monotonic() < build_deadline:
                return None
            if returncode is None:
                build.kill()
            build_status = "timeout" if returncode is None else ("ok" if returncode == 0 else "failed")
            note_build(build_status)
            write_json(json_path, report)
        return build_status

    pending = make_parts(args.dry_run, scratch)
    try:
        with log_path.open("w") as log:
            while pending:
                ready = next((p for p in pending if not p.needs_gsplat or finish_build(0) is not None), None)
                if ready is None:  # only parts that need gsplat are left: wait for its build
                    finish_build(build_deadline - time.monotonic())
                    continue
                pending.remove(ready)
                report["parts"][ready.name] = {"started_s": round(time.time() - started, 1),
                                               **run_part(ready, deadline, build_status, scratch, env, log)}
                if build_status is None:
                    note_build("running")  # how far it got, should the whole command be stopped now
                write_json(json_path, report)
    finally:
        build.kill()
        finish_build(0)
        shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps({name: part["status"] for name, part in report["parts"].items()}))
    print(f"wrote {json_path}")


def run_part(part: Part, deadline: float, build_status: str | None, scratch: Path, env: dict, log) -> dict:
    remaining = deadline - time.monotonic()
    if part.skip_reason:
        return {"status": "skipped", "reason": part.skip_reason, "cap_s": part.cap_s}
    if part.needs_gsplat and build_status != "ok":
        return {"status": "skipped", "reason": f"gsplat build {build_status} (see gsplat_build)", "cap_s": part.cap_s}
    if remaining < MIN_PART_S:
        return {"status": "skipped", "reason": f"{max(remaining, 0):.0f} s of the budget left", "cap_s": part.cap_s}
    cap = min(part.cap_s, remaining)
    print(f"gpu_check: {part.name} (cap {cap:.0f} s)", flush=True)
    run = Run(part.name, part.command, scratch / f"{part.name}.out", env)
    returncode = run.wait(cap)
    if returncode is None:
        run.kill()
    text = run.text()
    log.write(f"===== {part.name}: {' '.join(part.command)}\n{text}\n")
    log.flush()
    try:
        results = part.parse(text)
    except Exception as error:  # a parser must never lose the rest of the report
        results = {"parse_error": repr(error)}
    status = "timeout" if returncode is None else ("ok" if returncode == 0 else "failed")
    return {"status": status, "seconds": run.seconds, "cap_s": round(cap, 1), "returncode": returncode,
            "results": results, "output_tail": text[-TAIL_CHARS:]}


if __name__ == "__main__":
    main()
