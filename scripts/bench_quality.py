"""Quality benchmark: does Difix3D(+) improve 3DGS on extreme held-out views of unseen scenes?

Stages (each skipped when its result is on disk, so an interrupted run resumes cheaply):
1. scenes: K training and M evaluation scenes from disjoint seeds (`difix3d.scenes.build_scene`:
   12 sparse training views on one side, 8 extreme held-out views; the layout follows the seed);
2. curate: (degraded render, clean target, reference) pairs from the training scenes only
   (`difix3d.curation`, nerfstudio subprocesses);
3. difix: fine-tune the `tiny` Difix on those pairs (`difix3d.training`, CPU);
4. per evaluation scene, at the same total step count: plain 3DGS (`difix3d-gs` with Difix off),
   Difix3D (`rgb` of `difix3d-gs` with the trained Difix), Difix3D+ (`rgb_enhanced`), and Difix on
   the plain 3DGS renders only (the paper's ablation row), all scored here against the held-out
   photographs with one PSNR/SSIM (LPIPS when backbone weights exist) implementation;
5. report: `quality.json`, `quality.md`, `quality_grid.png` (GT | 3DGS | Difix3D | Difix3D+) and
   `quality_rounds.png` (metric vs fix round) in --results.

`--quick` is a smoke test of the whole chain (one small scene each, a handful of steps): its numbers
mean nothing. Prints the summary JSON on stdout.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pycolmap
import torch
import tyro

BIN = Path(sys.executable).parent
METHODS = ("3dgs", "difix3d", "difix3d+", "difix_on_3dgs")
LABELS = {
    "3dgs": "3DGS (Difix off)",
    "difix3d": "Difix3D",
    "difix3d+": "Difix3D+",
    "difix_on_3dgs": "Difix on 3DGS renders only",
}


@dataclass
class BenchQuality:
    """Settings; the defaults are the full run (about an hour on 2 CPU cores)."""

    work: Path = Path("bench_quality_work")
    """Scenes, curated pairs, the trained Difix and the nerfstudio runs (resumable)."""
    results: Path = Path("benchmarks")
    """Where quality.json, quality.md, quality_grid.png and quality_rounds.png go."""
    quick: bool = False
    """Smoke test: one small scene each, very few steps (overrides the sizes below)."""
    train_seeds: tuple[int, ...] = (101, 102, 103, 104, 105, 106)
    """Seeds of the training scenes (Difix's data)."""
    eval_seeds: tuple[int, ...] = (201, 202, 203, 204)
    """Seeds of the evaluation scenes (never seen by Difix)."""
    width: int = 160
    height: int = 120
    steps: int = 1000
    """3DGS steps of every evaluation run (plain and Difix3D alike)."""
    fix_start: int = 400
    steps_per_fix: int = 150
    pose_step: float = 0.3
    """Progressive pose step in nerfstudio's normalised scene units (scenes span about [-1, 1])."""
    pseudo_view_prob: float = 0.3
    curate_steps: int = 600
    """3DGS steps of a full curation reconstruction ("normal schedule")."""
    curate_strategies: tuple[str, ...] = ("sparse", "cross")
    autoencoder_steps: int = 400
    """Steps of the autoencoder pretraining that gives the tiny Difix a working VAE (SD-Turbo's is
    pretrained; a frozen random encoder and a LoRA-only decoder cannot even reproduce their input)."""
    autoencoder_lr: float = 1e-3
    difix_steps: int = 1500
    """Optimizer steps of the tiny Difix (batch 1, random crops)."""
    difix_crop: int = 96
    difix_lr: float = 5e-4
    """The tiny Difix starts from random weights, hence far above the release's 2e-5."""
    lambda_lpips: float = 0.0
    """LPIPS/Gram need ImageNet VGG-16 weights, absent offline: with random features they are not
    perceptual, so the full run trains on L2 only."""
    lambda_gram: float = 0.0
    grid_views: int = 2
    """Held-out views per evaluation scene shown in the grid."""
    threads: int = 1
    """Torch/OpenMP threads here and in the nerfstudio subprocesses (0: torch's default). On a busy
    2-core machine one thread is many times faster than two (no spinning on shared cores)."""
    ship: Path | None = None
    """Copy the trained Difix (weights, config, model card with these results) to this folder."""

    def resolved(self) -> BenchQuality:
        if not self.quick:
            return self
        return dataclasses.replace(
            self, train_seeds=self.train_seeds[:1], eval_seeds=self.eval_seeds[:1], width=80, height=60,
            steps=60, fix_start=20, steps_per_fix=20, curate_steps=30, curate_strategies=("sparse",),
            autoencoder_steps=4, difix_steps=4, difix_crop=48, grid_views=1,
        )  # fmt: skip


# ---------------------------------------------------------------------------------- helpers


def log(message: str) -> None:
    print(f"[bench_quality {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def subprocess_env(bench: BenchQuality) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if bench.threads:
        env["OMP_NUM_THREADS"] = str(bench.threads)
    return env


def run(bench: BenchQuality, *command: str | Path, log_file: Path) -> None:
    """Run a command, its output into `log_file`; raise with the log's tail when it fails."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("w") as output:
        result = subprocess.run([str(part) for part in command], env=subprocess_env(bench), stdout=output, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = log_file.read_text()[-3000:]
        raise RuntimeError(f"{Path(str(command[0])).name} failed (exit {result.returncode}); {log_file}:\n{tail}")


def write_json(path: Path, content) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(content, indent=1))
    temporary.replace(path)


def load_rgb(path: Path) -> torch.Tensor:
    """[3, H, W] float in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(iio.imread(path)[..., :3])).permute(2, 0, 1).float() / 255


def view_names(scene: Path, kind: str) -> list[str]:
    return sorted(path.name for path in (scene / "images").glob(f"frame_{kind}_*.png"))


def eval_names_in_target_order(scene: Path) -> list[str]:
    """Held-out view names in nerfstudio's order (COLMAP image id), which is the target order of the fix rounds."""
    reconstruction = pycolmap.Reconstruction(str(scene / "sparse" / "0"))
    return [image.name for _, image in sorted(reconstruction.images.items()) if "eval" in image.name]


# ---------------------------------------------------------------------------------- stages


def build_scenes(bench: BenchQuality) -> tuple[list[Path], list[Path]]:
    from difix3d.scenes import build_scene

    if set(bench.train_seeds) & set(bench.eval_seeds):
        raise SystemExit("training and evaluation seeds must be disjoint")
    scenes = {"train": [], "eval": []}
    for kind, seeds in (("train", bench.train_seeds), ("eval", bench.eval_seeds)):
        for seed in seeds:
            folder = bench.work / "scenes" / f"{kind}_{seed}"
            if not (folder / "ground_truth.json").is_file():
                log(f"building scene {folder.name}")
                build_scene(folder, seed=seed, width=bench.width, height=bench.height, overwrite=True, log=lambda m: None)
            scenes[kind].append(folder)
    return scenes["train"], scenes["eval"]


def curate_pairs(bench: BenchQuality, train_scenes: list[Path]) -> Path:
    from difix3d.curation import CurateConfig, curate

    log(f"curating {bench.curate_strategies} pairs from {len(train_scenes)} training scene(s)")
    result = curate(
        CurateConfig(
            scene=train_scenes, out=bench.work / "curated", strategies=bench.curate_strategies,
            steps=bench.curate_steps, device="cpu", test_fraction=0.1,
        )
    )  # fmt: skip
    log(f"dataset: {result.num_train} train / {result.num_test} test pairs")
    return result.dataset


def pretrain_autoencoder(bench: BenchQuality, dataset: Path) -> Path:
    """A `tiny` Difix whose VAE (encoder, decoder base weights, skip convs; LoRA and UNet untouched)
    is trained as a plain autoencoder (L2, posterior mean, no KL) on every image of the dataset."""
    import torch.nn.functional as F

    from difix3d.checkpoint import WEIGHTS_FILE, save_pretrained
    from difix3d.model import Difix

    folder = bench.work / "difix_init"
    if (folder / WEIGHTS_FILE).is_file():
        return folder
    log(f"pretraining the tiny Difix's autoencoder for {bench.autoencoder_steps} steps")
    content = json.loads(dataset.read_text())
    files = sorted({dataset.parent / pair[key] for split in content.values() for pair in split.values()
                    for key in ("image", "target_image", "ref_image") if pair.get(key)})  # fmt: skip
    images = torch.stack([load_rgb(file) for file in files]) * 2 - 1
    difix = Difix.from_config("tiny")
    parameters = [p for name, p in difix.vae.named_parameters() if "lora_" not in name]
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(parameters, lr=bench.autoencoder_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    crop = min(bench.difix_crop, images.shape[-2], images.shape[-1]) // 8 * 8
    difix.train()
    for step in range(bench.autoencoder_steps):
        index = torch.randint(len(images), (4,), generator=generator)
        top = int(torch.randint(images.shape[-2] - crop + 1, (1,), generator=generator))
        left = int(torch.randint(images.shape[-1] - crop + 1, (1,), generator=generator))
        batch = images[index, :, top : top + crop, left : left + crop]
        loss = F.mse_loss(difix.decode(*difix.encode(batch)), batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == bench.autoencoder_steps - 1:
            log(f"autoencoder step {step}: L2 {loss.item():.5f} (~{10 * np.log10(4 / loss.item()):.1f} dB)")
    difix._freeze()
    save_pretrained(difix.eval(), folder)
    return folder


def train_difix(bench: BenchQuality, dataset: Path) -> tuple[Path, dict]:
    """The trained tiny Difix folder and its training record (steps, losses, time)."""
    from difix3d.training import TrainConfig, train

    folder = bench.work / "difix"
    record_path = bench.work / "difix_training.json"
    if record_path.is_file():
        return folder, json.loads(record_path.read_text())
    start = pretrain_autoencoder(bench, dataset)
    log(f"training the tiny Difix for {bench.difix_steps} steps")
    started = time.perf_counter()
    result = train(
        TrainConfig(
            dataset=dataset, output=folder, model=str(start.resolve()), perceptual_backbone="random",
            lambda_lpips=bench.lambda_lpips, lambda_gram=bench.lambda_gram, gram_warmup_steps=0,
            steps=bench.difix_steps, crop_size=bench.difix_crop, learning_rate=bench.difix_lr,
            eval_every=max(bench.difix_steps // 4, 1), checkpoint_every=max(bench.difix_steps // 4, 1),
            resume=(folder / "checkpoints").is_dir() and any((folder / "checkpoints").glob("step-*")),
        )
    )  # fmt: skip
    record = {
        "steps": result.final_step,
        "seconds_this_session": round(time.perf_counter() - started, 1),
        "final_loss": result.losses[-1] if result.losses else None,
        "evaluations": result.evaluations,
        "dataset_pairs": {split: len(pairs) for split, pairs in json.loads(dataset.read_text()).items()},
    }
    write_json(record_path, record)
    return folder, record


def ns_train(bench: BenchQuality, scene: Path, run_root: Path, *extra: str | Path) -> Path:
    """A fresh `ns-train difix3d-gs` run of `bench.steps` steps; returns its config.yml."""
    shutil.rmtree(run_root, ignore_errors=True)
    run(
        bench, BIN / "ns-train", "difix3d-gs", "--data", scene, "--output-dir", run_root, "--experiment-name", "bench",
        "--timestamp", "run", "--machine.device-type", "cpu", "--vis", "tensorboard",
        "--max-num-iterations", bench.steps, "--steps-per-save", bench.steps,
        "--steps-per-eval-image", 10 * bench.steps, "--steps-per-eval-all-images", 10 * bench.steps,
        "--pipeline.model.num-downscales", 0, *extra,
        log_file=run_root / "ns-train.log",
    )  # fmt: skip
    return run_root / "bench" / "difix3d-gs" / "run" / "config.yml"


def ns_render(bench: BenchQuality, config: Path, split: str, names: list[str], output: Path) -> None:
    run(
        bench, BIN / "ns-render", "dataset", "--load-config", config, "--split", split,
        "--rendered-output-names", *names, "--image-format", "png", "--output-path", output,
        log_file=output.parent / f"ns-render-{split}.log",
    )  # fmt: skip


class Scorer:
    """PSNR, SSIM and (when backbone weights exist) LPIPS of one image against its ground truth."""

    def __init__(self):
        from difix3d.metrics import LPIPSMetric

        self.lpips = LPIPSMetric("alex")

    def __call__(self, prediction: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        from difix3d.metrics import psnr, ssim

        prediction, target = prediction[None], target[None]
        scores = {"psnr": float(psnr(prediction, target)), "ssim": float(ssim(prediction, target))}
        lpips = self.lpips(prediction, target)
        if lpips is not None:
            scores["lpips"] = float(lpips)
        return scores


def evaluate_scene(bench: BenchQuality, scene: Path, difix_folder: Path, difix, scorer: Scorer) -> dict:
    """All four methods on one evaluation scene; cached in work/eval/<scene>/result.json."""
    from difix3d.curation import load_scene, nearest_references

    out = bench.work / "eval" / scene.name
    result_path = out / "result.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    eval_views, train_views = view_names(scene, "eval"), view_names(scene, "train")

    plain_renders = out / "plain" / "renders"
    if not (out / "plain" / "done").is_file():
        log(f"{scene.name}: plain 3DGS, {bench.steps} steps")
        started = time.perf_counter()
        config = ns_train(bench, scene, out / "plain" / "run", "--pipeline.difix.enabled", "False")
        ns_render(bench, config, "train+test", ["rgb"], plain_renders)
        (out / "plain" / "done").write_text(f"{time.perf_counter() - started:.1f}\n")

    difix_renders = out / "difix3d" / "renders"
    if not (out / "difix3d" / "done").is_file():
        log(f"{scene.name}: Difix3D, {bench.steps} steps")
        started = time.perf_counter()
        config = ns_train(
            bench, scene, out / "difix3d" / "run", "--pipeline.difix.model", difix_folder.resolve(),
            "--pipeline.progressive.fix-start", bench.fix_start, "--pipeline.progressive.steps-per-fix", bench.steps_per_fix,
            "--pipeline.progressive.pose-step", bench.pose_step, "--pipeline.progressive.pseudo-view-prob", bench.pseudo_view_prob,
        )  # fmt: skip
        ns_render(bench, config, "test", ["rgb", "rgb_enhanced"], difix_renders)
        (out / "difix3d" / "done").write_text(f"{time.perf_counter() - started:.1f}\n")

    # Difix on the plain renders, referenced like Difix3D+ by the nearest training view.
    views = load_scene(scene)
    references = nearest_references(views, eval_views, train_views)
    fixed_dir = out / "difix_on_3dgs"
    fixed_dir.mkdir(parents=True, exist_ok=True)
    for view, reference in zip(eval_views, references):
        render = load_rgb(plain_renders / "test" / "rgb" / view)
        fixed = difix.fix(render, load_rgb(scene / "images" / reference)).clamp(0, 1)
        iio.imwrite(fixed_dir / view, (fixed.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))

    sources = {
        "3dgs": plain_renders / "test" / "rgb",
        "difix3d": difix_renders / "test" / "rgb",
        "difix3d+": difix_renders / "test" / "rgb_enhanced",
        "difix_on_3dgs": fixed_dir,
    }
    per_view = {
        method: {view: scorer(load_rgb(folder / view), load_rgb(scene / "images" / view)) for view in eval_views}
        for method, folder in sources.items()
    }
    train_psnr = [
        scorer(load_rgb(plain_renders / "train" / "rgb" / view), load_rgb(scene / "images" / view))["psnr"]
        for view in train_views
    ]
    result = {
        "scene": scene.name,
        "per_view": per_view,
        "mean": {method: mean_scores(scores.values()) for method, scores in per_view.items()},
        "train_view_psnr_3dgs": float(np.mean(train_psnr)),
        "rounds": round_scores(scene, out / "difix3d" / "run" / "bench" / "difix3d-gs" / "run" / "difix3d", scorer),
        "seconds": {
            "3dgs": float((out / "plain" / "done").read_text()),
            "difix3d": float((out / "difix3d" / "done").read_text()),
        },
        "paths": {method: str(folder) for method, folder in sources.items()},
    }
    write_json(result_path, result)
    return result


def mean_scores(scores) -> dict[str, float]:
    scores = list(scores)
    return {key: float(np.mean([s[key] for s in scores])) for key in scores[0]}


def round_scores(scene: Path, progressive_dir: Path, scorer: Scorer) -> list[dict]:
    """Per fix round: mean PSNR/SSIM of the 3DGS render and of its Difix output at the pseudo views
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


# ---------------------------------------------------------------------------------- report


def summarise(results: list[dict]) -> dict:
    """Mean and standard deviation over scenes of each method's per-scene mean, and gains over 3DGS."""
    summary = {}
    for method in METHODS:
        summary[method] = {}
        for metric in results[0]["mean"][method]:
            values = [result["mean"][method][metric] for result in results]
            summary[method][metric] = {"mean": float(np.mean(values)), "std": float(np.std(values))}
    gains = {}
    for method in METHODS[1:]:
        gains[method] = {}
        for metric in summary[method]:
            values = [result["mean"][method][metric] - result["mean"]["3dgs"][metric] for result in results]
            gains[method][metric] = {"mean": float(np.mean(values)), "std": float(np.std(values))}
    train_psnr = [result["train_view_psnr_3dgs"] for result in results]
    return {
        "methods": summary,
        "gain_over_3dgs": gains,
        "train_view_psnr_3dgs": {"mean": float(np.mean(train_psnr)), "min": float(np.min(train_psnr))},
    }


def targets(summary: dict) -> dict:
    gains = summary["gain_over_3dgs"]
    return {
        "difix3d+_psnr_gain>=1.0": gains["difix3d+"]["psnr"]["mean"] >= 1.0,
        "difix3d_psnr_gain>=0.5": gains["difix3d"]["psnr"]["mean"] >= 0.5,
        "difix3d+_ssim_not_worse": gains["difix3d+"]["ssim"]["mean"] >= 0,
        "difix3d_ssim_not_worse": gains["difix3d"]["ssim"]["mean"] >= 0,
        "train_view_psnr_3dgs>=25": summary["train_view_psnr_3dgs"]["min"] >= 25,
    }


def markdown(bench: BenchQuality, results: list[dict], summary: dict, training: dict, command: str) -> str:
    metrics = list(summary["methods"]["3dgs"])
    lines = [
        "# Quality benchmark (held-out extreme views of unseen procedural scenes)",
        "",
        f"Command: `{command}`",
        "",
        f"{len(results)} evaluation scenes (seeds {', '.join(map(str, bench.eval_seeds))}), "
        f"{bench.width}x{bench.height}, {bench.steps} 3DGS steps per run; Difix3D fix rounds from step "
        f"{bench.fix_start} every {bench.steps_per_fix} (pose step {bench.pose_step}). Difix: `tiny`, trained "
        f"{training['steps']} steps on pairs curated from {len(bench.train_seeds)} other scenes (seeds "
        f"{', '.join(map(str, bench.train_seeds))}). Plain 3DGS on its own training views: "
        f"{summary['train_view_psnr_3dgs']['mean']:.2f} dB (min {summary['train_view_psnr_3dgs']['min']:.2f}).",
        "",
        "Mean ± standard deviation over scenes (each scene: mean over its held-out views):",
        "",
        "| method | " + " | ".join(m.upper() for m in metrics) + " | ΔPSNR vs 3DGS |",
        "|---|" + "---|" * (len(metrics) + 1),
    ]
    for method in METHODS:
        cells = [f"{summary['methods'][method][m]['mean']:.4f} ± {summary['methods'][method][m]['std']:.4f}" for m in metrics]
        gain = summary["gain_over_3dgs"].get(method, {}).get("psnr")
        gain_cell = "" if gain is None else f"{gain['mean']:+.2f} ± {gain['std']:.2f}"
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + f" | {gain_cell} |")
    lines += ["", "Per scene (PSNR / SSIM):", "", "| scene | " + " | ".join(LABELS[m] for m in METHODS) + " | 3DGS train-view PSNR |"]
    lines.append("|---|" + "---|" * (len(METHODS) + 1))
    for result in results:
        cells = [f"{result['mean'][m]['psnr']:.2f} / {result['mean'][m]['ssim']:.4f}" for m in METHODS]
        lines.append(f"| {result['scene']} | " + " | ".join(cells) + f" | {result['train_view_psnr_3dgs']:.2f} |")
    lines += ["", "Targets (mean over scenes):", ""]
    lines += [f"- {name}: {'met' if ok else 'MISSED'}" for name, ok in targets(summary).items()]
    if "lpips" not in metrics:
        lines += ["", "LPIPS: unavailable (no AlexNet ImageNet weights on this machine)."]
    return "\n".join(lines) + "\n"


def grid_image(bench: BenchQuality, results: list[dict], scenes: dict[str, Path]) -> np.ndarray:
    """Rows: held-out views; columns: GT | 3DGS | Difix3D | Difix3D+."""
    columns = ("3dgs", "difix3d", "difix3d+")
    rows = []
    for result in results:
        scene = scenes[result["scene"]]
        for view in sorted(result["per_view"]["3dgs"])[: bench.grid_views]:
            tiles = [iio.imread(scene / "images" / view)[..., :3]]
            tiles += [iio.imread(Path(result["paths"][method]) / view)[..., :3] for method in columns]
            rows.append(np.concatenate([np.pad(t, ((2, 2), (2, 2), (0, 0)), constant_values=255) for t in tiles], axis=1))
    return np.concatenate(rows, axis=0)


def rounds_plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for result in results:
        rounds = result["rounds"]
        x = [r["round"] for r in rounds]
        for kind, style in (("render", "-o"), ("fixed", "--x")):
            y = [r[kind]["psnr"] if r[kind] else np.nan for r in rounds]
            left.plot(x, y, style, label=f"{result['scene']} {kind}")
        right.plot(x, [r["mean_distance"] for r in rounds], "-o", label=result["scene"])
        left.axhline(result["mean"]["3dgs"]["psnr"], color="gray", lw=0.5)
    left.set(xlabel="fix round", ylabel="PSNR (dB) at targets reached", title="pseudo views on target: render vs Difix")
    right.set(xlabel="fix round", ylabel="mean pose distance to target", title="progressive poses")
    left.legend(fontsize=6)
    right.legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def ship(bench: BenchQuality, difix_folder: Path, training: dict, summary: dict, command: str) -> None:
    """Copy the trained Difix (config + safetensors) to `bench.ship` with a model card."""
    from difix3d.checkpoint import CONFIG_FILE, WEIGHTS_FILE

    destination = bench.ship
    destination.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        shutil.copyfile(difix_folder / name, destination / name)
    card = (difix_folder / "README.md").read_text()
    gains = summary["gain_over_3dgs"]
    table = (bench.results / "quality.md").read_text()
    destination.joinpath("README.md").write_text(
        "# difix-tiny-procedural: a small Difix trained on procedural scenes, on the CPU\n\n"
        "The `tiny` Difix architecture (a few MB; not SD-Turbo), trained from random weights by "
        "`scripts/bench_quality.py` on (degraded render, clean target, reference) pairs that "
        f"`difix3d curate` made from {len(bench.train_seeds)} procedural scenes (strategies: "
        f"{', '.join(bench.curate_strategies)}; {bench.curate_steps}-step reconstructions at "
        f"{bench.width}x{bench.height}). It knows only those procedural rooms: it is the embedded "
        "default so that the CPU demo runs a trained Difix, not a model for photographs — name "
        "`nvidia/difix_ref` for that. Its outputs are smoother than the renders: PSNR rises, SSIM "
        "falls (see the benchmark below). Load it with `load_difix(difix3d.checkpoint.EMBEDDED_DIFIX)`; "
        "`difix3d fix` and `make demo` use it when no model is named.\n\n"
        f"- **Autoencoder pretraining** (stands in for SD-Turbo's pretrained VAE): encoder, decoder and "
        f"skip convs, {bench.autoencoder_steps} steps, batch 4, L2, AdamW lr {bench.autoencoder_lr:g}, on "
        "every image of the dataset; then the encoder is frozen as in Difix.\n"
        f"- **Difix training**: {training['steps']} steps, batch 1, random {bench.difix_crop}px crops, AdamW lr "
        f"{bench.difix_lr:g}; loss L2 only (λ_LPIPS {bench.lambda_lpips:g}, λ_Gram {bench.lambda_gram:g}: no "
        "ImageNet VGG-16 weights offline, and random-feature LPIPS/Gram are not perceptual); pairs: "
        f"{training['dataset_pairs']}; {training['seconds_this_session']:.0f} s on a shared 2-core CPU.\n"
        f"- **Held-out scenes** ({len(bench.eval_seeds)}, seeds {', '.join(map(str, bench.eval_seeds))}): "
        f"Difix3D {gains['difix3d']['psnr']['mean']:+.2f} dB, Difix3D+ {gains['difix3d+']['psnr']['mean']:+.2f} dB, "
        f"Difix on 3DGS renders {gains['difix_on_3dgs']['psnr']['mean']:+.2f} dB PSNR over plain 3DGS.\n"
        f"- **Command**: `{command}`\n\n"
        "## Benchmark\n\n" + table.split("\n", 2)[2] + "\n## Training record (written by `difix3d train`)\n\n"
        + card[card.index("- **Started from**") :]
    )
    log(f"shipped the trained Difix to {destination}")


def check_work_settings(bench: BenchQuality) -> None:
    """Stages are reused by their files alone, so one work folder must keep one set of settings."""
    settings = {k: v for k, v in dataclasses.asdict(bench).items() if k not in ("work", "results", "threads", "ship")}
    settings = json.loads(json.dumps(settings, default=str))
    path = bench.work / "settings.json"
    if path.is_file() and json.loads(path.read_text()) != settings:
        raise SystemExit(f"{bench.work} holds a run with other settings ({path}); delete it or choose another --work")
    write_json(path, settings)


def main(bench: BenchQuality) -> dict:
    bench = bench.resolved()
    check_work_settings(bench)
    from difix3d.runtime import configure_cpu_runtime

    configure_cpu_runtime(bench.threads)
    command = "python scripts/bench_quality.py " + " ".join(sys.argv[1:])
    started = time.perf_counter()
    train_scenes, eval_scenes = build_scenes(bench)
    dataset = curate_pairs(bench, train_scenes)
    difix_folder, training = train_difix(bench, dataset)

    from difix3d.checkpoint import load_difix

    difix = load_difix(difix_folder)
    scorer = Scorer()
    results = [evaluate_scene(bench, scene, difix_folder, difix, scorer) for scene in eval_scenes]
    summary = summarise(results)
    report = {
        "command": command,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(bench).items()},
        "difix_training": training,
        "summary": summary,
        "targets": targets(summary),
        "scenes": [{k: v for k, v in r.items() if k != "paths"} for r in results],
        "seconds_this_invocation": round(time.perf_counter() - started, 1),  # resumed stages cost nothing
        "torch_threads": torch.get_num_threads(),
    }
    bench.results.mkdir(parents=True, exist_ok=True)
    write_json(bench.results / "quality.json", report)
    (bench.results / "quality.md").write_text(markdown(bench, results, summary, training, command))
    iio.imwrite(bench.results / "quality_grid.png", grid_image(bench, results, {s.name: s for s in eval_scenes}))
    rounds_plot(results, bench.results / "quality_rounds.png")
    if bench.ship is not None:
        ship(bench, difix_folder, training, summary, command)
    print(json.dumps({"summary": summary, "targets": report["targets"]}, indent=1))
    return report


if __name__ == "__main__":
    main(tyro.cli(BenchQuality))
