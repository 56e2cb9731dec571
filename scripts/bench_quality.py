"""Quality benchmark: does Difix3D(+) improve 3DGS on extreme held-out views of unseen scenes?

Modes:
- `--baselines-only`: only the stages no Difix takes part in (evaluation scenes, plain 3DGS
  repeats), so they can run while a Difix trains;
- otherwise: score a given Difix (`--difix`: a model folder, `embedded` for the Difix that ships in
  the package, or any `difix3d.models.checkpoint.load_difix` spec). Training one is not the benchmark's
  job: `scripts/train_embedded_difix.py` (or `difix3d curate` + `difix3d train`) makes them.

Per evaluation scene (seeds `difix3d.data.seeds.EVALUATION_SEEDS`, 12 sparse training views on one side
and 8 extreme held-out views; Difix never sees these seeds), every comparison is paired:
1. plain 3DGS (`difix3d-gs` with Difix off) and Difix3D train with the same training seed; training
   is deterministic, so the two runs are identical up to the first fix round (checked: their
   checkpoints of the step before it are compared bit for bit) and "Difix3D minus 3DGS" measures
   Difix, not a different reconstruction. (Not by resuming Difix3D from the plain run's checkpoint:
   nerfstudio 1.1.5's Splatfacto replaces its Gaussians on loading, after the optimizers were built
   on the old ones, so a resumed run never updates a Gaussian again.)
2. Difix3D+ is the `rgb_enhanced` render of that same Difix3D render; "Difix on 3DGS renders" runs
   Difix on the plain run's scored renders, with the reference the plugin would choose (the nearest
   training view in nerfstudio's scene units);
3. noise floor: plain 3DGS is repeated with K training seeds (`--noise-seeds`); the
   report gives the seed-to-seed spread next to every difference and marks a difference "within
   noise" when a change of seed alone gives one that large;
4. Difix on clean renders of the training views (referenced by the nearest other training view):
   what Difix costs where there is nothing to fix.

Every stage is a folder with a `stage.json` recording the settings, the inputs and the code (git
commit, uncommitted changes, a hash of the code) that made it. A resumed run reuses a finished
stage only when its settings match and it came from the same code (`--allow-mixed-code` to reuse
stages of other code anyway; the report then lists every commit involved). Plain 3DGS stages do
not depend on the Difix, so evaluating another Difix in the same `--work` only runs its Difix3D
stages. Scores are recomputed from the stored images on every run. Stages record their wall and
CPU time; `--jobs` runs scenes in parallel.

Results in --results: `quality.json` (`summary/methods/<method>/{psnr,ssim,lpips}/mean`, the code,
the noise floor, the paired differences), `quality.md` (its first table is the README's),
`quality_grid.png` (labelled columns) and `quality_rounds.png` (metric vs fix round).

`--quick` is a smoke test of the whole chain (one small scene, a handful of steps): its numbers
mean nothing. Prints the summary JSON on stdout.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import imageio.v3 as iio
import numpy as np
import pycolmap
import torch
import tyro
from tqdm import tqdm

from difix3d.core.progressive import ProgressiveConfig
from difix3d.data.seeds import EVALUATION_SEEDS
from difix3d.devices import device_name
from difix3d.errors import Difix3DError
from difix3d.images import from_uint8, to_uint8
from nerfstudio_plugin import runner as nerfstudio_runner

REPO = Path(__file__).resolve().parents[1]
CODE_PATHS = ("difix3d", "nerfstudio_plugin", "scripts/bench_quality.py", "pyproject.toml")
"""What "the code" of a stage is: its hash covers every .py file below these paths."""
STAGE_RECORD = "stage.json"
METHODS = ("3dgs", "difix3d", "difix3d+", "difix_on_3dgs")
LABELS = {
    "3dgs": "3DGS (Difix off)",
    "difix3d": "Difix3D",
    "difix3d+": "Difix3D+",
    "difix_on_3dgs": "Difix on 3DGS renders only",
}
SHORT_LABELS = {"gt": "GT", "3dgs": "3DGS", "difix3d": "Difix3D", "difix3d+": "Difix3D+", "difix_on_3dgs": "Difix on 3DGS"}
PAIRS = (("difix3d", "3dgs"), ("difix3d+", "3dgs"), ("difix_on_3dgs", "3dgs"), ("difix3d+", "difix3d"))
"""Paired differences reported, (method, baseline): every pair shares its 3DGS run up to fix_start."""
NOISE_SIGMAS = 2.0
"""A difference is "within noise" below this many standard deviations of a seed-only difference."""


@dataclass
class BenchQuality:
    """Settings; the defaults are the full run."""

    work: Path = Path("bench_quality_work")
    """Evaluation scenes and the nerfstudio runs (resumable stages)."""
    results: Path = Path("benchmarks")
    """Where quality.json, quality.md, quality_grid.png and quality_rounds.png go."""
    quick: bool = False
    """Smoke test: one small scene, very few steps (overrides the sizes below)."""
    baselines_only: bool = False
    """Run only the stages no Difix takes part in (evaluation scenes, plain 3DGS repeats), then stop:
    they can run while a Difix trains, and a later run of the same code reuses them."""
    difix: str = "embedded"
    """The Difix to evaluate: a model folder, `embedded` (the Difix shipped in the package), or any
    `load_difix` spec (`random-tiny-architecture`: random weights, for smoke tests)."""
    eval_seeds: tuple[int, ...] = EVALUATION_SEEDS
    """Seeds of the evaluation scenes (`difix3d.data.seeds`: reserved, never used for Difix training data)."""
    noise_seeds: tuple[int, ...] = (0, 1, 2)
    """Training seeds of the plain 3DGS repeats (nerfstudio's seed and camera-order seed); Difix3D
    continues from the first one's checkpoint."""
    allow_mixed_code: bool = False
    """Reuse finished stages made by other code (another commit, uncommitted changes) instead of refusing."""
    width: int = 160
    height: int = 120
    scene_content: Literal["shapes", "materials"] = "shapes"
    """What the evaluation scenes' surfaces show (`difix3d.data.scenes.SCENE_CONTENTS`): "shapes" or
    "materials"; choose the content the Difix was trained on."""
    steps: int = 1000
    """3DGS steps of every evaluation run (plain and Difix3D alike)."""
    fix_start: int = 400
    """Step of Difix3D's first fix round; before it, Difix3D and plain 3DGS are the same run."""
    steps_per_fix: int = 150
    pose_step: float = 0.3
    """Progressive pose step in nerfstudio's normalised scene units (scenes span about [-1, 1])."""
    pseudo_view_prob: float = 0.3
    pseudo_view_loss_weight: float = ProgressiveConfig.pseudo_view_loss_weight
    """Weight of Difix3D's photometric loss on a pseudo view (0.3: the release)."""
    pseudo_view_loss_downsample: int = ProgressiveConfig.pseudo_view_loss_downsample
    """Difix3D compares each pseudo view with its render after pooling both by this factor (1: the release)."""
    jobs: int = 2
    """Evaluation scenes run at once, each subprocess with `threads` threads (2 on 2 cores: about half
    the time of 1 when nothing else runs)."""
    grid_views: int = 1
    """Held-out views per evaluation scene shown in the grid."""
    threads: int = 1
    """Torch/OpenMP threads here and in the nerfstudio subprocesses (0: torch's default). On a busy
    2-core machine one thread is many times faster than two (no spinning on shared cores)."""
    model_card: Path | None = None
    """A model card (README.md) whose `## Benchmark` section is (re)written with this run's table."""

    def resolved(self) -> BenchQuality:
        if not self.quick:
            return self
        return dataclasses.replace(
            self, eval_seeds=self.eval_seeds[:1], noise_seeds=self.noise_seeds[:2], width=80, height=60,
            steps=60, fix_start=20, steps_per_fix=20, grid_views=1,
        )  # fmt: skip

    def check(self) -> None:
        if len(self.noise_seeds) < 2 or len(set(self.noise_seeds)) != len(self.noise_seeds):
            raise Difix3DError(f"--noise-seeds needs at least 2 distinct seeds for a noise floor, got {self.noise_seeds}")
        if not 2 <= self.fix_start < self.steps:
            raise Difix3DError(f"--fix-start must lie inside the run: 2 <= {self.fix_start} < steps = {self.steps}")


# ---------------------------------------------------------------------------------- helpers


def log(message: str) -> None:
    print(f"[bench_quality {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def write_json(path: Path, content) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(content, indent=1))
    temporary.replace(path)


def portable(value: str) -> str:
    """A path as a report may show it: relative to the repository inside it, its last part outside
    (never this machine's folders); anything else unchanged."""
    if not os.path.isabs(value):
        return value
    path = Path(value).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else path.name


def jsonable(value):
    return json.loads(json.dumps(value, default=lambda item: portable(str(item)) if isinstance(item, Path) else str(item)))


def load_rgb(path: Path) -> torch.Tensor:
    """[3, H, W] float in [0, 1]."""
    return from_uint8(torch.from_numpy(np.ascontiguousarray(iio.imread(path)[..., :3]))).permute(2, 0, 1)


def save_rgb(path: Path, image: torch.Tensor) -> None:
    iio.imwrite(path, to_uint8(image.permute(1, 2, 0)).numpy())


def view_names(scene: Path, kind: str) -> list[str]:
    return sorted(path.name for path in (scene / "images").glob(f"frame_{kind}_*.png"))


def eval_names_in_target_order(scene: Path) -> list[str]:
    """Held-out view names in nerfstudio's order (COLMAP image id), which is the target order of the fix rounds."""
    reconstruction = pycolmap.Reconstruction(str(scene / "sparse" / "0"))
    return [image.name for _, image in sorted(reconstruction.images.items()) if "eval" in image.name]


def hash_files(digest, root: Path, files) -> None:
    for file in files:
        digest.update(file.relative_to(root).as_posix().encode() + b"\0")
        with file.open("rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\0")


# ---------------------------------------------------------------------------------- provenance


_CPU = threading.local()


def cpu_seconds() -> float:
    """CPU time of this thread and of the subprocesses it ran (`run`): unlike
    wall time, it does not grow when other jobs share the cores."""
    return time.thread_time() + getattr(_CPU, "children", 0.0)


def add_children_cpu(seconds: float) -> None:
    _CPU.children = getattr(_CPU, "children", 0.0) + seconds


def git(*arguments: str) -> str | None:
    try:
        result = subprocess.run(["git", "-C", str(REPO), *arguments], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def code_version() -> dict:
    """The code that runs now: git commit, whether the code paths have uncommitted changes, and a
    hash of the code files themselves (what stages are compared by, so a commit that only touches
    documentation does not invalidate finished stages)."""
    files = []
    for name in CODE_PATHS:
        path = REPO / name
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path] if path.is_file() else []
    digest = hashlib.sha256()
    hash_files(digest, REPO, files)
    status = git("status", "--porcelain", "--", *CODE_PATHS)
    return {
        "commit": git("rev-parse", "HEAD") or "unknown",
        "dirty": None if status is None else bool(status),
        "code_hash": digest.hexdigest()[:16],
    }


def machine_description() -> dict:
    """The machine that runs now. The figures depend on it: a CPU 3DGS run repeats bit for bit on one
    machine but diverges on another (floating point), by as much as a change of training seed."""
    return {"cpu": device_name("cpu"), "cores": os.cpu_count(), "system": platform.system(), "torch": torch.__version__}


def describe_machine(machine: dict | None) -> str:
    if machine is None:
        return "a machine not recorded"
    return f"{machine['cpu']}, {machine['cores']} cores, {machine['system']}, torch {machine['torch']}"


def describe_code(code: dict) -> str:
    state = {True: " + uncommitted changes", False: "", None: " (dirty state unknown)"}[code["dirty"]]
    return f"{code['commit'][:12]}{state} (code hash {code['code_hash']})"


@dataclass
class StageBook:
    """Finished stages: a stage is a folder whose `stage.json` records its settings, its inputs
    (the records of the stages it was made from) and the code that made it."""

    work: Path
    code: dict
    allow_mixed_code: bool
    records: dict[str, dict] = field(default_factory=dict)
    ran: list[str] = field(default_factory=list)
    machine: dict = field(default_factory=machine_description)

    def ensure(self, folder: Path, settings: dict, make: Callable[[], None], inputs: tuple[dict, ...] = ()) -> dict:
        """The record of the stage in `folder`, running `make()` first unless it is finished with
        these settings and inputs. Refuses a stage made with other settings or by other code."""
        name = folder.relative_to(self.work).as_posix()
        settings = jsonable(settings)
        input_ids = {record["stage"]: record["finished"] for record in inputs}
        path = folder / STAGE_RECORD
        if path.is_file():
            record = json.loads(path.read_text())
            if record["settings"] != settings:
                changed = sorted(key for key in {**settings, **record["settings"]} if settings.get(key) != record["settings"].get(key))
                raise Difix3DError(
                    f"stage {name} was made with other settings ({', '.join(changed)}); delete {folder} "
                    "(or choose another --work) to redo it"
                )
            if record["inputs"] == input_ids:
                if record["code"]["code_hash"] != self.code["code_hash"] and not self.allow_mixed_code:
                    raise Difix3DError(
                        f"stage {name} was made by other code ({describe_code(record['code'])}) than this "
                        f"({describe_code(self.code)}); delete {self.work} (or that stage) to redo it, or pass "
                        "--allow-mixed-code to reuse it"
                    )
                self.records[name] = record
                return record
            log(f"{name}: its inputs were redone since; redoing it")
        started, cpu_started = time.perf_counter(), cpu_seconds()
        make()
        record = {
            "stage": name,
            "settings": settings,
            "inputs": input_ids,
            "code": self.code,
            "machine": self.machine,
            "seconds": round(time.perf_counter() - started, 1),
            "cpu_seconds": round(cpu_seconds() - cpu_started, 1),
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        }
        write_json(path, record)
        self.records[name] = record
        self.ran.append(name)
        return record

    def _group_stages(self, key: Callable[[dict], str], entry: Callable[[dict], dict]) -> list[dict]:
        """The stages used, grouped by `key(record)`: each group is `entry(record)` plus its stages."""
        groups: dict[str, dict] = {}
        for name, record in sorted(self.records.items()):
            groups.setdefault(key(record), {**entry(record), "stages": []})["stages"].append(name)
        return list(groups.values())

    def code_versions(self) -> list[dict]:
        """Every code version among the stages used, with the stages it made."""
        return self._group_stages(lambda record: record["code"]["code_hash"], lambda record: record["code"])

    def machines(self) -> list[dict]:
        """Every machine among the stages used (None: a stage recorded before machines were), with its stages."""
        return self._group_stages(lambda record: describe_machine(record.get("machine")), lambda record: {"machine": record.get("machine")})


def difix_identity(spec: str) -> str:
    """A folder-name-safe id of a Difix: its name plus a hash of its weights and config (of the spec
    itself for names such as `tiny` and hub ids)."""
    from difix3d.models.checkpoint import CONFIG_FILE, WEIGHTS_FILE

    path = Path(spec)
    digest = hashlib.sha256()
    if path.is_dir():
        files = [path / CONFIG_FILE, path / WEIGHTS_FILE] if (path / CONFIG_FILE).is_file() else sorted(
            file for file in path.rglob("*") if file.is_file() and file.suffix != ".md"
        )
        hash_files(digest, path, files)
        name = path.name
    elif path.is_file():
        hash_files(digest, path.parent, [path])
        name = path.stem
    else:
        digest.update(spec.encode())
        name = spec.replace("/", "_")
    return f"{name}-{digest.hexdigest()[:10]}"


def resolve_difix_spec(spec: str) -> str:
    from difix3d.models.ids import EMBEDDED_DIFIX

    if spec == "embedded":
        return EMBEDDED_DIFIX
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


# ---------------------------------------------------------------------------------- stages


def build_scenes(bench: BenchQuality, book: StageBook, kind: str, seeds) -> list[tuple[Path, dict]]:
    from difix3d.data.scenes import build_scene

    scenes = []
    for seed in seeds:
        folder = bench.work / "scenes" / f"{kind}_{seed}"

        def make(folder=folder, seed=seed):
            log(f"building scene {folder.name}")
            build_scene(folder, seed=seed, width=bench.width, height=bench.height, overwrite=True, log=lambda m: None,
                        content=bench.scene_content)  # fmt: skip

        key = {"seed": seed, "width": bench.width, "height": bench.height}
        if bench.scene_content != "shapes":  # the key of scenes built before there was a choice stays valid
            key["content"] = bench.scene_content
        scenes.append((folder, book.ensure(folder, key, make)))
    return scenes


def train_and_render(bench: BenchQuality, scene: Path, run_root: Path, seed: int, extra: Sequence[str | Path], split: str,
                     names: list[str], renders: Path) -> Path:  # fmt: skip
    """A fresh `ns-train difix3d-gs` run of `bench.steps` steps with training seed `seed`, then
    `ns-render` of the `names` outputs of `split` into `renders`, in one child process (each
    nerfstudio start costs about 13 s of CPU); returns the run's config.yml. The run keeps its
    checkpoint of step fix_start - 1 (the last step before the first fix round), where a plain and a
    Difix3D run of one seed must still be identical, and its last one."""
    shutil.rmtree(run_root, ignore_errors=True)
    train = nerfstudio_runner.train_command(
        scene, run_root, "bench", bench.steps, *extra, device="cpu", seed=seed, save_every=bench.fix_start - 1, keep_checkpoints=True
    )
    config = run_base(run_root) / "config.yml"
    render = nerfstudio_runner.render_command(config, split, names, renders)
    env = {"HF_HUB_OFFLINE": "1", **({"OMP_NUM_THREADS": str(bench.threads)} if bench.threads else {})}
    add_children_cpu(nerfstudio_runner.run_in_one_process([train, render], log_file=run_root / "ns-train-and-render.log", env=env))
    checkpoints = run_base(run_root) / "nerfstudio_models"
    keep = {checkpoint_path(run_root, bench.fix_start - 1), max(checkpoints.glob("step-*.ckpt"))}
    for checkpoint in checkpoints.glob("step-*.ckpt"):
        if checkpoint not in keep:
            checkpoint.unlink()  # only the last one was rendered
    return config


def run_base(run_root: Path) -> Path:
    return nerfstudio_runner.run_dir(run_root, "bench")


def checkpoint_path(run_root: Path, step: int) -> Path:
    return run_base(run_root) / "nerfstudio_models" / f"step-{step:09d}.ckpt"


def same_checkpoints(first: Path, second: Path) -> bool:
    """Whether two nerfstudio checkpoints hold bit-identical models and optimizer states."""

    def tensors(path: Path) -> dict:
        state = torch.load(path, map_location="cpu", weights_only=False)
        flat = {f"pipeline/{k}": v for k, v in state["pipeline"].items() if isinstance(v, torch.Tensor)}
        for name, optimizer in state["optimizers"].items():
            for index, values in optimizer["state"].items():
                flat.update({f"optimizer/{name}/{index}/{k}": v for k, v in values.items() if isinstance(v, torch.Tensor)})
        return flat

    a, b = tensors(first), tensors(second)
    return a.keys() == b.keys() and all(a[key].shape == b[key].shape and torch.equal(a[key], b[key]) for key in a)


@dataclass
class SceneRuns:
    """Where one evaluation scene's stages are, and their records."""

    scene: Path
    plain: dict[int, Path] = field(default_factory=dict)
    """Training seed -> the plain 3DGS stage folder (renders/{train,test}/rgb, run/)."""
    difix3d: Path | None = None
    """The Difix3D stage folder (renders/test/{rgb,rgb_enhanced}, run/, pairing.json)."""
    on_renders: Path | None = None
    """Difix on the first seed's plain renders: {test,train}/."""
    records: list[dict] = field(default_factory=list)


PSEUDO_VIEW_LOSS_WORDS = {
    "pseudo_view_loss_weight": "pseudo-view loss weight {}",
    "pseudo_view_loss_downsample": "pseudo-view loss on {}x-pooled images",
}
"""How the report names each pseudo-view loss setting that is not the release's."""


def pseudo_view_loss_settings(bench: BenchQuality) -> dict:
    """The pseudo-view loss settings that differ from the release's (`ProgressiveConfig`'s defaults).
    A Difix3D stage records only these, so stages made before the options existed stay valid."""
    return {name: getattr(bench, name) for name in PSEUDO_VIEW_LOSS_WORDS if getattr(bench, name) != getattr(ProgressiveConfig, name)}


def plain_runs(bench: BenchQuality, book: StageBook, scene: Path, scene_record: dict) -> SceneRuns:
    """The plain 3DGS repeats of one evaluation scene (one per noise seed): no Difix involved."""
    out = bench.work / "eval" / scene.name
    runs = SceneRuns(scene, records=[scene_record])
    for seed in bench.noise_seeds:
        folder = out / f"plain_seed{seed}"

        def make_plain(folder=folder, seed=seed):
            log(f"{scene.name}: plain 3DGS, training seed {seed}, {bench.steps} steps")
            train_and_render(bench, scene, folder / "run", seed, ["--pipeline.difix.enabled", "False"], "train+test", ["rgb"], folder / "renders")

        settings = {"train_seed": seed, "steps": bench.steps, "checkpoint_step": bench.fix_start - 1}
        runs.records.append(book.ensure(folder, settings, make_plain, (scene_record,)))
        runs.plain[seed] = folder
    return runs


def evaluate_scene(bench: BenchQuality, book: StageBook, scene: Path, scene_record: dict, difix_spec: str, difix_id: str, get_difix) -> SceneRuns:
    runs = plain_runs(bench, book, scene, scene_record)
    out = bench.work / "eval" / scene.name
    seed = bench.noise_seeds[0]
    plain, plain_record = runs.plain[seed], runs.records[1]
    runs.difix3d = out / f"difix-{difix_id}" / "difix3d"

    def make_difix3d():
        log(f"{scene.name}: Difix3D, training seed {seed}, {bench.steps} steps")
        method = ["--pipeline.difix.model", difix_spec,
                  "--pipeline.progressive.fix-start", bench.fix_start, "--pipeline.progressive.steps-per-fix", bench.steps_per_fix,
                  "--pipeline.progressive.pose-step", bench.pose_step, "--pipeline.progressive.pseudo-view-prob", bench.pseudo_view_prob,
                  "--pipeline.progressive.pseudo-view-loss-weight", bench.pseudo_view_loss_weight,
                  "--pipeline.progressive.pseudo-view-loss-downsample", bench.pseudo_view_loss_downsample]  # fmt: skip
        train_and_render(bench, scene, runs.difix3d / "run", seed, method, "test", ["rgb", "rgb_enhanced"], runs.difix3d / "renders")
        step = bench.fix_start - 1
        identical = same_checkpoints(checkpoint_path(plain / "run", step), checkpoint_path(runs.difix3d / "run", step))
        if not identical:
            log(f"{scene.name}: WARNING: Difix3D and plain 3DGS differ at step {step}, before the first fix round")
        write_json(runs.difix3d / "pairing.json", {"identical_to_plain_3dgs_at_step": step, "identical": identical})

    settings = {
        "difix": difix_id, "train_seed": seed, "steps": bench.steps, "fix_start": bench.fix_start,
        "steps_per_fix": bench.steps_per_fix, "pose_step": bench.pose_step, "pseudo_view_prob": bench.pseudo_view_prob,
    }  # fmt: skip
    settings.update(pseudo_view_loss_settings(bench))
    runs.records.append(book.ensure(runs.difix3d, settings, make_difix3d, (plain_record,)))

    runs.on_renders = out / f"difix-{difix_id}" / "on_renders"

    def make_on_renders():
        log(f"{scene.name}: Difix on the plain 3DGS renders (held-out and training views)")
        difix_on_renders(scene, plain, runs.on_renders, get_difix())

    runs.records.append(book.ensure(runs.on_renders, {"difix": difix_id}, make_on_renders, (plain_record,)))
    return runs


def difix_on_renders(scene: Path, plain: Path, output: Path, difix) -> None:
    """Difix on the plain 3DGS renders: held-out views referenced as the plugin's Difix3D+ does (the
    nearest training view in nerfstudio's scene units), training views by the nearest *other*
    training view (its own photograph would let Difix copy the answer)."""
    from difix3d.data.curation import load_scene, nearest_references

    views = load_scene(scene)
    # nerfstudio moves the scene rigidly and scales it; the pose distance (translation + rotation
    # angle) changes only by that scale, which weighs translation against rotation.
    scale = json.loads((run_base(plain / "run") / "dataparser_transforms.json").read_text())["scale"]
    poses = views.poses.copy()
    poses[:, :3, 3] *= scale
    scaled = dataclasses.replace(views, poses=poses)
    train_views = view_names(scene, "train")
    for split, names in (("test", view_names(scene, "eval")), ("train", train_views)):
        references = nearest_references(scaled, names, train_views)
        renders = torch.stack([load_rgb(plain / "renders" / split / "rgb" / name) for name in names])
        refs = torch.stack([load_rgb(scene / "images" / reference) for reference in references])
        with torch.no_grad():
            fixed = difix.fix(renders, refs)
        (output / split).mkdir(parents=True, exist_ok=True)
        for name, image in zip(names, fixed):
            save_rgb(output / split / name, image)


# ---------------------------------------------------------------------------------- scores


class Scorer:
    """PSNR, SSIM and (when the AlexNet weights exist) LPIPS of one image against its ground truth."""

    def __init__(self):
        from difix3d.metrics import LPIPSMetric

        self.lpips = LPIPSMetric("alex")
        self.lpips_unavailable = self.lpips.unavailable_reason

    def __call__(self, prediction: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        from difix3d.metrics import image_scores

        return image_scores(prediction[None], target[None], self.lpips)

    def folder(self, folder: Path, scene: Path, names: list[str]) -> dict[str, dict[str, float]]:
        return {name: self(load_rgb(folder / name), load_rgb(scene / "images" / name)) for name in names}


def mean_scores(scores) -> dict[str, float]:
    scores = list(scores)
    return {key: float(np.mean([s[key] for s in scores])) for key in scores[0]}


def score_scene(bench: BenchQuality, runs: SceneRuns, scorer: Scorer) -> dict:
    scene = runs.scene
    eval_views, train_views = view_names(scene, "eval"), view_names(scene, "train")
    first = bench.noise_seeds[0]
    sources = {
        "3dgs": runs.plain[first] / "renders" / "test" / "rgb",
        "difix3d": runs.difix3d / "renders" / "test" / "rgb",
        "difix3d+": runs.difix3d / "renders" / "test" / "rgb_enhanced",
        "difix_on_3dgs": runs.on_renders / "test",
    }
    per_view = {method: scorer.folder(folder, scene, eval_views) for method, folder in sources.items()}
    seeds = {
        str(seed): mean_scores(scorer.folder(folder / "renders" / "test" / "rgb", scene, eval_views).values())
        for seed, folder in runs.plain.items()
    }
    train_views_3dgs = {
        str(seed): mean_scores(scorer.folder(folder / "renders" / "train" / "rgb", scene, train_views).values())
        for seed, folder in runs.plain.items()
    }
    train_views_fixed = mean_scores(scorer.folder(runs.on_renders / "train", scene, train_views).values())
    return {
        "scene": scene.name,
        "per_view": per_view,
        "mean": {method: mean_scores(scores.values()) for method, scores in per_view.items()},
        "plain_seeds": seeds,
        "train_views": {"3dgs": train_views_3dgs[str(first)], "difix_on_3dgs": train_views_fixed, "3dgs_seeds": train_views_3dgs},
        "rounds": round_scores(scene, run_base(runs.difix3d / "run") / "difix3d", scorer),
        "pairing": json.loads((runs.difix3d / "pairing.json").read_text()),
        "seconds": {record["stage"]: record["seconds"] for record in runs.records},
        "paths": {method: str(folder) for method, folder in sources.items()},
    }


def round_scores(scene: Path, progressive_dir: Path, scorer: Scorer) -> list[dict]:
    """Per fix round: mean scores of the 3DGS render and of its Difix output at the pseudo views
    that reached their target (only those have a photograph), and the mean distance to target."""
    manifest = json.loads((progressive_dir / "manifest.json").read_text())
    targets = eval_names_in_target_order(scene)
    rounds = []
    for round_ in manifest["rounds"]:
        on_target = [view for view in round_["views"] if view["snapped"]]
        entry = {
            "round": round_["index"] if "index" in round_ else len(rounds),
            "step": round_["step"],
            "mean_distance": float(np.mean([view["distance"] for view in round_["views"]])),
            "on_target": len(on_target),
        }
        directory = progressive_dir / f"round_{entry['round']:03d}"
        for kind in ("render", "fixed"):
            scores = [
                scorer(load_rgb(directory / kind / f"{view['target_index']:03d}.png"), load_rgb(scene / "images" / targets[view["target_index"]]))
                for view in on_target
            ]  # fmt: skip
            entry[kind] = mean_scores(scores) if scores else None
        rounds.append(entry)
    return rounds


# ---------------------------------------------------------------------------------- summary


def spread(values) -> dict:
    """Mean and standard deviation (population, as over a fixed set of scenes)."""
    return {"mean": float(np.mean(values)), "std": float(np.std(values))}


def noise_floor(bench: BenchQuality, results: list[dict], metrics: list[str]) -> dict:
    """Seed-to-seed spread of plain 3DGS: per scene the sample standard deviation over the training
    seeds, pooled over scenes; and the band a seed-only difference stays inside (NOISE_SIGMAS standard
    deviations of the difference of two seeds: sqrt(2) sigma per scene, sqrt(2/M) sigma for a mean over M scenes)."""
    per_scene = {
        result["scene"]: {
            metric: {"values": [result["plain_seeds"][str(s)][metric] for s in bench.noise_seeds],
                     "std": float(np.std([result["plain_seeds"][str(s)][metric] for s in bench.noise_seeds], ddof=1))}
            for metric in metrics
        }
        for result in results
    }  # fmt: skip
    pooled = {metric: float(np.sqrt(np.mean([scene[metric]["std"] ** 2 for scene in per_scene.values()]))) for metric in metrics}
    count = len(results)
    return {
        "seeds": list(bench.noise_seeds),
        "per_scene": per_scene,
        "seed_std": pooled,
        "band_per_scene": {m: NOISE_SIGMAS * math.sqrt(2) * pooled[m] for m in metrics},
        "band_mean": {m: NOISE_SIGMAS * math.sqrt(2 / count) * pooled[m] for m in metrics},
        "rule": f"within noise: |difference| < {NOISE_SIGMAS:g} x the standard deviation of a difference between two "
        "plain 3DGS runs that differ only in training seed (sqrt(2) x seed_std per scene, sqrt(2/M) x seed_std for the mean over M scenes)",
    }


def paired_differences(results: list[dict], metrics: list[str], noise: dict) -> dict:
    differences = {}
    for method, baseline in PAIRS:
        entry = {}
        for metric in metrics:
            per_scene = {r["scene"]: r["mean"][method][metric] - r["mean"][baseline][metric] for r in results}
            mean = float(np.mean(list(per_scene.values())))
            entry[metric] = {
                **spread(list(per_scene.values())),
                "per_scene": per_scene,
                "noise_band": noise["band_mean"][metric],
                "within_noise": abs(mean) < noise["band_mean"][metric],
                "per_scene_within_noise": {s: abs(d) < noise["band_per_scene"][metric] for s, d in per_scene.items()},
            }
        differences[f"{method} - {baseline}"] = entry
    return differences


def summarise(bench: BenchQuality, results: list[dict], scorer: Scorer) -> dict:
    metrics = list(results[0]["mean"]["3dgs"])
    methods = {method: {metric: spread([r["mean"][method][metric] for r in results]) for metric in metrics} for method in METHODS}
    for method in METHODS:  # the layout stays the same whether LPIPS could be computed or not
        methods[method].setdefault("lpips", None)
    noise = noise_floor(bench, results, metrics)
    train_3dgs = [r["train_views"]["3dgs"]["psnr"] for r in results]
    cost = [r["train_views"]["3dgs"]["psnr"] - r["train_views"]["difix_on_3dgs"]["psnr"] for r in results]
    return {
        "methods": methods,
        "metrics": metrics,
        "paired_runs_identical_before_first_round": all(r["pairing"]["identical"] for r in results),
        "lpips": {"available": "lpips" in metrics, "reason": scorer.lpips_unavailable},
        "noise_floor": noise,
        "paired_differences": paired_differences(results, metrics, noise),
        "train_view_psnr_3dgs": {"mean": float(np.mean(train_3dgs)), "min": float(np.min(train_3dgs))},
        "difix_on_training_views": {
            "3dgs": {m: spread([r["train_views"]["3dgs"][m] for r in results]) for m in metrics},
            "difix": {m: spread([r["train_views"]["difix_on_3dgs"][m] for r in results]) for m in metrics},
            "psnr_cost": spread(cost),
        },
    }


def targets(summary: dict) -> dict:
    """Issue 11's targets (mean over scenes); None where a metric is unavailable."""
    differences = summary["paired_differences"]
    lpips = summary["methods"]["3dgs"]["lpips"]
    return {
        "difix3d+_psnr_gain>=1.0": differences["difix3d+ - 3dgs"]["psnr"]["mean"] >= 1.0,
        "difix3d_psnr_gain>=0.5": differences["difix3d - 3dgs"]["psnr"]["mean"] >= 0.5,
        "difix3d+_ssim_not_worse": differences["difix3d+ - 3dgs"]["ssim"]["mean"] >= 0,
        "difix3d_ssim_not_worse": differences["difix3d - 3dgs"]["ssim"]["mean"] >= 0,
        "difix3d+_lpips<=0.85x3dgs": None if lpips is None else summary["methods"]["difix3d+"]["lpips"]["mean"] <= 0.85 * lpips["mean"],
        "difix_on_training_views_cost<=0.3dB": summary["difix_on_training_views"]["psnr_cost"]["mean"] <= 0.3,
        "train_view_psnr_3dgs>=25": summary["train_view_psnr_3dgs"]["min"] >= 25,
    }


# ---------------------------------------------------------------------------------- report


def fmt(value: float, metric: str, signed: bool = False) -> str:
    digits = 2 if metric == "psnr" else 3
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def difference_cell(entry: dict, metric: str) -> str:
    mark = " (within noise)" if entry["within_noise"] else ""
    return f"{fmt(entry['mean'], metric, True)} ± {fmt(entry['std'], metric)}{mark}"


def stage_sources(groups: list[dict], current: str, noun: str, describe: Callable[[dict], str]) -> str:
    """"; stages from N <noun>: ..." unless every stage of a report comes from `current` (described)."""
    if [describe(group) for group in groups] == [current]:
        return ""
    if len(groups) == 1:
        return f"; all stages from `{describe(groups[0])}`"
    return f"; stages from {len(groups)} {noun}: " + ", ".join(f"`{describe(group)}` ({len(group['stages'])} stages)" for group in groups)


def markdown(bench: BenchQuality, report: dict, results: list[dict]) -> str:
    summary = report["summary"]
    metrics, noise, differences = summary["metrics"], summary["noise_floor"], summary["paired_differences"]
    all_metrics = ("psnr", "ssim", "lpips")
    code = report["code"]
    lines = [
        "# Quality benchmark (held-out extreme views of unseen procedural scenes)",
        "",
        f"Code: `{describe_code(code['current'])}`"
        + stage_sources(code["stages"], describe_code(code["current"]), "code versions (--allow-mixed-code)", describe_code),
        "",
        f"Machine: `{describe_machine(report['machine']['current'])}`"
        + stage_sources(report["machine"]["stages"], describe_machine(report["machine"]["current"]), "machines",
                        lambda group: describe_machine(group["machine"]))
        + " (a CPU 3DGS run repeats bit for bit on one machine, not across machines)",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Difix: {report['difix']['description']} (id `{report['difix']['id']}`).",
        "",
        f"{len(results)} evaluation scenes (seeds {', '.join(map(str, bench.eval_seeds))}"
        + ("" if bench.scene_content == "shapes" else f", content {bench.scene_content}")
        + f"), {bench.width}x{bench.height}, "
        f"{bench.steps} 3DGS steps per run. Plain 3DGS and Difix3D train with the same seed and are the same run up to "
        f"Difix3D's first fix round at step {bench.fix_start} ("
        + ("checked bit for bit in every scene" if summary["paired_runs_identical_before_first_round"] else "**NOT identical in every scene: see quality.json**")
        + f"; then a round every {bench.steps_per_fix} steps, pose step {bench.pose_step}"
        + "".join(", " + PSEUDO_VIEW_LOSS_WORDS[name].format(value) for name, value in pseudo_view_loss_settings(bench).items())
        + "). Difix3D+ is Difix on that Difix3D render; Difix on "
        f"3DGS renders is Difix on the plain render. Noise floor: plain 3DGS with training seeds "
        f"{', '.join(map(str, bench.noise_seeds))}. Plain 3DGS on its own training views: "
        f"{summary['train_view_psnr_3dgs']['mean']:.2f} dB (min {summary['train_view_psnr_3dgs']['min']:.2f}).",
        "",
        "## Results",
        "",
        "Mean ± standard deviation over scenes (each scene: mean over its held-out views); Δ: paired difference to "
        "plain 3DGS (the same run up to the first fix round), mean ± std over scenes, \"within noise\" when a change of "
        f"training seed alone gives differences that large (band ±{fmt(noise['band_mean']['psnr'], 'psnr')} dB PSNR).",
        "",
        "| method | PSNR | SSIM | LPIPS | ΔPSNR | ΔSSIM | ΔLPIPS |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        cells = []
        for metric in all_metrics:
            value = summary["methods"][method].get(metric)
            cells.append("n/a" if value is None else f"{fmt(value['mean'], metric)} ± {fmt(value['std'], metric)}")
        for metric in all_metrics:
            if metric not in metrics:
                cells.append("n/a")
            elif method == "3dgs":
                cells.append(f"seed std {fmt(noise['seed_std'][metric], metric)}")
            else:
                cells.append(difference_cell(differences[f"{method} - 3dgs"][metric], metric))
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    lines += ["", "Difix3D+ − Difix3D (the post-render pass alone): "
              + ", ".join(f"{metric.upper()} {difference_cell(differences['difix3d+ - difix3d'][metric], metric)}" for metric in metrics)]
    if not summary["lpips"]["available"]:
        lines += ["", f"LPIPS: n/a — {summary['lpips']['reason']}."]

    lines += ["", "## Noise floor and paired differences per scene", "",
              f"Plain 3DGS PSNR per training seed and its seed-to-seed standard deviation; paired ΔPSNR per scene "
              f"(* = within noise: |Δ| < {fmt(noise['band_per_scene']['psnr'], 'psnr')} dB). Pooled seed std: "
              + ", ".join(f"{m.upper()} {fmt(noise['seed_std'][m], m)}" for m in metrics) + ".", ""]
    pair_names = [f"{m} - {b}" for m, b in PAIRS]
    header = ["scene", *(f"3DGS seed {s}" for s in bench.noise_seeds), "seed std", *(name.replace(" - ", " − ") for name in pair_names)]
    lines += ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for result in results:
        scene_noise = noise["per_scene"][result["scene"]]["psnr"]
        cells = [f"{value:.2f}" for value in scene_noise["values"]] + [f"{scene_noise['std']:.2f}"]
        for name in pair_names:
            entry = differences[name]["psnr"]
            star = "*" if entry["per_scene_within_noise"][result["scene"]] else ""
            cells.append(f"{entry['per_scene'][result['scene']]:+.2f}{star}")
        lines.append(f"| {result['scene']} | " + " | ".join(cells) + " |")

    lines += ["", "## Per scene (" + " / ".join(m.upper() for m in metrics) + ")", "",
              "| scene | " + " | ".join(LABELS[m] for m in METHODS) + " | 3DGS train-view PSNR |",
              "|---|" + "---|" * (len(METHODS) + 1)]
    for result in results:
        cells = [" / ".join(fmt(result["mean"][m][metric], metric) for metric in metrics) for m in METHODS]
        lines.append(f"| {result['scene']} | " + " | ".join(cells) + f" | {result['train_views']['3dgs']['psnr']:.2f} |")

    train = summary["difix_on_training_views"]
    lines += ["", "## Difix on clean training-view renders", "",
              "Plain 3DGS renders of its own training views, and Difix on them (referenced by the nearest other "
              "training view): what Difix costs where there is nothing to fix.", "",
              "| | " + " | ".join(m.upper() for m in metrics) + " |", "|---|" + "---|" * len(metrics),
              "| 3DGS render | " + " | ".join(f"{fmt(train['3dgs'][m]['mean'], m)} ± {fmt(train['3dgs'][m]['std'], m)}" for m in metrics) + " |",
              "| Difix on it | " + " | ".join(f"{fmt(train['difix'][m]['mean'], m)} ± {fmt(train['difix'][m]['std'], m)}" for m in metrics) + " |",
              "", f"PSNR cost: {train['psnr_cost']['mean']:+.2f} ± {train['psnr_cost']['std']:.2f} dB."]

    lines += ["", "## Targets (mean over scenes)", ""]
    lines += [f"- {name}: {'n/a' if ok is None else 'met' if ok else 'MISSED'}" for name, ok in report["targets"].items()]
    timing = report["timing"]
    lines += ["", "## Time", "",
              "Wall / CPU minutes per kind of stage (CPU time does not grow when other jobs share the cores): "
              + ", ".join(f"{kind} {t['seconds'] / 60:.1f} / {t['cpu_seconds'] / 60:.1f}" for kind, t in timing["stages_by_kind"].items())
              + f"; evaluation in all {timing['evaluation_seconds'] / 60:.1f} / {timing['evaluation_cpu_seconds'] / 60:.1f} min "
              f"({report['torch_threads']} torch thread)."]
    return "\n".join(lines) + "\n"


def grid_image(bench: BenchQuality, results: list[dict], scenes: dict[str, Path]) -> np.ndarray:
    """Rows: held-out views; columns GT | 3DGS | Difix3D | Difix3D+ | Difix on 3DGS, labelled on top."""
    from PIL import Image, ImageDraw, ImageFont

    columns = ("gt", *METHODS)
    rows = []
    for result in results:
        scene = scenes[result["scene"]]
        for view in sorted(result["per_view"]["3dgs"])[: bench.grid_views]:
            tiles = [iio.imread(scene / "images" / view)[..., :3]]
            tiles += [iio.imread(Path(result["paths"][method]) / view)[..., :3] for method in METHODS]
            rows.append(np.concatenate([np.pad(t, ((2, 2), (2, 2), (0, 0)), constant_values=255) for t in tiles], axis=1))
    grid = np.concatenate(rows, axis=0)
    tile_width = grid.shape[1] // len(columns)
    font_size = max(8, min(14, tile_width // 9))
    header = font_size + 8
    canvas = Image.new("RGB", (grid.shape[1], grid.shape[0] + header), "white")
    canvas.paste(Image.fromarray(grid), (0, header))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=font_size)
    for index, column in enumerate(columns):
        draw.text((index * tile_width + tile_width / 2, header / 2), SHORT_LABELS[column], fill="black", font=font, anchor="mm")
    return np.asarray(canvas)


def rounds_plot(results: list[dict], path: Path) -> None:
    """Per fix round: PSNR of the pseudo views on their targets (render and its Difix fix) and the
    pose distance left; thin lines are scenes, thick lines the mean over scenes (a legend per scene
    is unreadable past a few scenes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def mean_curve(curves: list[list[float]]) -> np.ndarray:
        length = max(len(curve) for curve in curves)
        padded = np.full((len(curves), length), np.nan)
        for row, curve in zip(padded, curves):
            row[: len(curve)] = curve
        with warnings.catch_warnings():  # a round no scene reached is NaN, not a warning
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(padded, axis=0)

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    curves: dict[str, list[list[float]]] = {"render": [], "fixed": [], "distance": []}
    for result in results:
        for kind in ("render", "fixed"):
            curves[kind].append([r[kind]["psnr"] if r[kind] else np.nan for r in result["rounds"]])
        curves["distance"].append([r["mean_distance"] for r in result["rounds"]])
    styles = {"render": ("tab:blue", "-o", "render at the pseudo pose"), "fixed": ("tab:orange", "--x", "Difix on that render")}
    for kind, (colour, style, label) in styles.items():
        for curve in curves[kind]:
            left.plot(range(len(curve)), curve, style, color=colour, alpha=0.25, lw=0.8, ms=3)
        mean = mean_curve(curves[kind])
        left.plot(range(len(mean)), mean, style, color=colour, lw=2.5, label=f"{label} (mean)")
    left.axhline(float(np.mean([r["mean"]["3dgs"]["psnr"] for r in results])), color="gray", lw=1, ls=":", label="plain 3DGS, held-out views (mean)")
    for curve in curves["distance"]:
        right.plot(range(len(curve)), curve, "-o", color="tab:green", alpha=0.25, lw=0.8, ms=3)
    mean = mean_curve(curves["distance"])
    right.plot(range(len(mean)), mean, "-o", color="tab:green", lw=2.5, label="mean over scenes")
    left.set(xlabel="fix round", ylabel="PSNR (dB)", title=f"pseudo views on their targets ({len(results)} scenes)")
    right.set(xlabel="fix round", ylabel="mean pose distance to target", title="progressive poses")
    for axis in (left, right):
        axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_model_card_section(card: Path, report: dict, table: str) -> None:
    """Replace (or add) the `## Benchmark` section of a model card with this run's report."""
    text = card.read_text() if card.is_file() else ""
    start = text.find("\n## Benchmark")
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start] + (text[end:] if end >= 0 else "")
    # The report's own sections become subsections, so the whole of it is replaced next time.
    body = re.sub(r"^(#{2,}) ", r"#\1 ", table.split("\n", 2)[2], flags=re.MULTILINE)
    section = "\n## Benchmark\n\n" + f"`{report['command']}`\n\n" + body
    card.write_text(text.rstrip("\n") + "\n" + section)
    log(f"wrote the benchmark into {card}")


def stage_kind(name: str) -> str:
    parts = name.split("/")
    if parts[0] == "eval":
        return "3dgs" if parts[2].startswith("plain") else parts[-1]
    return parts[0]


def main(bench: BenchQuality) -> dict:
    bench = bench.resolved()
    bench.check()
    from difix3d.runtime import configure_cpu_runtime

    configure_cpu_runtime(bench.threads)
    command = "python scripts/bench_quality.py " + " ".join(portable(argument) for argument in sys.argv[1:])
    started = time.perf_counter()
    code = code_version()
    log(f"code: {describe_code(code)}")
    book = StageBook(bench.work, code, bench.allow_mixed_code)

    if bench.baselines_only:
        eval_scenes = build_scenes(bench, book, "eval", bench.eval_seeds)
        with ThreadPoolExecutor(max_workers=max(bench.jobs, 1)) as pool:
            for future in [pool.submit(plain_runs, bench, book, scene, record) for scene, record in eval_scenes]:
                future.result()
        log(f"baselines done ({len(eval_scenes)} scenes x {len(bench.noise_seeds)} seeds); run again with --difix to evaluate one")
        return {}

    difix_spec = resolve_difix_spec(bench.difix)
    description = f"`{bench.difix}`"
    difix_id = difix_identity(difix_spec)
    log(f"Difix {difix_spec} (id {difix_id})")

    difix_lock = threading.Lock()

    @functools.cache
    def load():
        from difix3d.models.checkpoint import load_difix

        return load_difix(difix_spec)

    def get_difix():
        with difix_lock:  # scenes may run in threads (--jobs): load once
            return load()

    eval_scenes = build_scenes(bench, book, "eval", bench.eval_seeds)
    with ThreadPoolExecutor(max_workers=max(bench.jobs, 1)) as pool:
        futures = [pool.submit(evaluate_scene, bench, book, scene, record, difix_spec, difix_id, get_difix) for scene, record in eval_scenes]
        for _ in tqdm(as_completed(futures), total=len(futures), desc="evaluation scenes", unit="scene", disable=len(futures) < 2):
            pass
        all_runs = [future.result() for future in futures]
    scorer = Scorer()
    results = [score_scene(bench, runs, scorer) for runs in all_runs]
    summary = summarise(bench, results, scorer)
    by_kind: dict[str, dict[str, float]] = {}
    for name, record in book.records.items():
        totals = by_kind.setdefault(stage_kind(name), {"seconds": 0.0, "cpu_seconds": 0.0})
        totals["seconds"] += record["seconds"]
        totals["cpu_seconds"] += record.get("cpu_seconds", 0.0)
    evaluation = [r for name, r in book.records.items() if name.startswith(("eval/", "scenes/eval_"))]
    report = {
        "command": command,
        "code": {"current": code, "stages": book.code_versions()},
        "machine": {"current": book.machine, "stages": book.machines()},
        "difix": {"spec": bench.difix, "id": difix_id, "description": description},
        "settings": jsonable(dataclasses.asdict(bench)),
        "summary": summary,
        "targets": targets(summary),
        "scenes": [{k: v for k, v in r.items() if k != "paths"} for r in results],
        "timing": {
            "stages_by_kind": {kind: {k: round(v, 1) for k, v in totals.items()} for kind, totals in by_kind.items()},
            "evaluation_seconds": round(sum(r["seconds"] for r in evaluation), 1),
            "evaluation_cpu_seconds": round(sum(r.get("cpu_seconds", 0.0) for r in evaluation), 1),
            "stages_run_now": book.ran,
            "seconds_this_invocation": round(time.perf_counter() - started, 1),
        },
        "torch_threads": torch.get_num_threads(),
    }
    bench.results.mkdir(parents=True, exist_ok=True)
    write_json(bench.results / "quality.json", report)
    (bench.results / "quality.md").write_text(markdown(bench, report, results))
    iio.imwrite(bench.results / "quality_grid.png", grid_image(bench, results, {s.name: s for s, _ in eval_scenes}))
    rounds_plot(results, bench.results / "quality_rounds.png")
    if bench.model_card is not None:
        write_model_card_section(bench.model_card, report, (bench.results / "quality.md").read_text())
    print(json.dumps({"code": code, "difix": report["difix"], "summary": {k: summary[k] for k in ("methods", "paired_differences", "difix_on_training_views")},
                      "noise_floor_seed_std": summary["noise_floor"]["seed_std"], "targets": report["targets"]}, indent=1))  # fmt: skip
    return report


if __name__ == "__main__":
    try:
        main(tyro.cli(BenchQuality))
    except Difix3DError as error:
        print(f"bench_quality: {error}", file=sys.stderr)
        sys.exit(2)
