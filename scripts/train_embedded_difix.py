"""Train the embedded Difix from scratch on procedural scenes, one resumable stage at a time.

Stages (each skipped when its result is on disk, so the job can span sessions):
1. scenes: `--num-scenes` procedural training scenes (seeds from `TRAIN_SEED_START`, disjoint from
   every benchmark seed), without SfM (the ground-truth engine knows the true poses);
2. pairs: the ground-truth data engine (`difix3d.data.ground_truth_pairs`) on each scene, then the
   dataset JSON (`difix3d.data.curation.assemble_dataset`);
3. autoencoder: the VAE (encoder, decoder, skip convs) of a fresh `--architecture` Difix trained as an
   autoencoder on the scenes' clean views, checked on held-out scenes (`difix3d.training.autoencoder`); it
   needs no pairs, so it can run beside stage 2 (`--stages autoencoder`);
4. difix: `difix3d train` from that autoencoder made image-preserving (`difix3d.training.autoencoder.identity_start`:
   it begins by reproducing its input and learns corrections), with the paper's loss (L2 + LPIPS +
   Gram on ImageNet VGG-16).

Each stage adds its figures (CPU seconds, autoencoder PSNR, Difix scores) to WORK/record.json.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro
from tqdm.auto import tqdm

TRAIN_SEED_START = 3000
"""Training scenes use seeds TRAIN_SEED_START, TRAIN_SEED_START + 1, ... (never `difix3d.data.seeds`' evaluation seeds)."""
AUTOENCODER_HELD_OUT_SCENES = 4
TEST_FRACTION = 0.05


@dataclass
class Settings:
    work: Path = Path("difix_training_work")
    """Scenes, pairs, the autoencoder and the Difix run (resumable)."""
    num_scenes: int = 32
    shard: str | None = None
    """"i/n": stages 1-2 for scenes i, i+n, ... only (run several processes side by side)."""
    stages: tuple[str, ...] = ("scenes", "pairs", "autoencoder", "difix")
    """Stages to run (each skips what is already on disk)."""
    width: int = 160
    height: int = 120
    scene_content: Literal["shapes", "materials"] = "shapes"
    """What the scenes' surfaces show (`difix3d.data.scenes.SCENE_CONTENTS`): "shapes" or "materials"."""
    steps_3dgs: int = 1000
    architecture: str = "small"
    autoencoder_steps: int = 3000
    autoencoder_lr: float = 1e-3
    autoencoder_latent_only_weight: float = 1.0
    """Weight of the autoencoder's L2 term on reproductions decoded from the latent alone (0: the
    first embedded Difix's autoencoder, whose decoder bypassed its latent)."""
    autoencoder_unit_latent: bool = True
    """Give the latents unit standard deviation through the VAE's scaling factor (False: SD's 0.18215)."""
    autoencoder_degraded_skip_weight: float = 0.0
    """Weight of the autoencoder's term that decodes a clean image's latent with the skips of its
    degraded render (the pairs stage's training pairs, from the autoencoder's training scenes): the
    decoder learns to follow its latent where the skips are wrong. 0: clean images only."""
    autoencoder_pairs: int = 2000
    """At most this many training pairs (evenly spaced) for that term."""
    difix_steps: int = 10_000
    difix_lr: float = 2e-4
    """A from-scratch UNet needs far more than the release's 2e-5 (which fine-tunes SD-Turbo)."""
    difix_unet_lr: float | None = None
    """The UNet's own learning rate (None: `difix_lr`); its last conv starts at zero (identity start)."""
    crop: int = 160
    """Crop side for Difix training (160 at 160x120: whole images, so holes keep their context)."""
    l2_form: Literal["mse", "log-mse"] = "mse"
    """The pixel term (`difix3d train --l2-form`): the paper's L2, or each image's log10 MSE."""
    lambda_l2: float = 1.0
    lambda_lpips: float = 1.0
    lambda_gram: float = 0.5
    """The paper's L = L2 + LPIPS + 0.5 Gram."""
    gram_warmup_steps: int = 2000
    lambda_latent: float = 0.0
    """Weight of the L2 between the UNet's latent and the target's (`difix3d train --lambda-latent`)."""
    near_identity_repeats: int = 1
    """How many times each training-pose pair (a nearly clean render and its own training image) is
    listed in the training split: Difix3D+ needs Difix to leave clean renders alone."""
    clean_identity_repeats: int = 0
    """How many times the training split lists, for each training pose of the near-identity pairs,
    its ray-traced truth as both input and target (same reference): Difix must leave clean images alone."""
    difix_run: str = "difix"
    """Folder of the Difix run inside WORK (copy a run's folder to branch it off at its last checkpoint)."""
    eval_pairs: int = 64
    """Test pairs of each Difix evaluation (the first ones of the dataset's test split)."""
    threads: int = 1
    """PyTorch's CPU threads (1 is fastest when other jobs share the cores)."""


def log(message: str) -> None:
    print(f"[train_embedded_difix {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def record(settings: Settings, stage: str, values: dict, add_cpu_seconds: float | None = None) -> None:
    """Merge `values` into WORK/record.json under `stage`; `add_cpu_seconds` adds to the stage's
    `cpu_seconds` (a stage resumed in several runs counts them all)."""
    path = settings.work / "record.json"
    content = json.loads(path.read_text()) if path.is_file() else {}
    content[stage] = {**content.get(stage, {}), **values}
    if add_cpu_seconds is not None:
        content[stage]["cpu_seconds"] = round(content[stage].get("cpu_seconds", 0.0) + add_cpu_seconds, 1)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(content, indent=1))
    temporary.replace(path)


def scene_dirs(settings: Settings) -> list[Path]:
    from difix3d.data.curation import parse_shard
    from difix3d.data.seeds import is_evaluation_seed

    index, count = parse_shard(settings.shard)
    seeds = range(TRAIN_SEED_START, TRAIN_SEED_START + settings.num_scenes)
    if any(is_evaluation_seed(seed) for seed in seeds):
        raise SystemExit(f"training seeds {seeds.start}-{seeds.stop - 1} overlap the benchmark's evaluation seeds")
    return [settings.work / "scenes" / f"train_{seed}" for seed in seeds][index::count]


def build_scenes(settings: Settings) -> None:
    from difix3d.data.scenes import GROUND_TRUTH_FILE, build_scene, load_ground_truth

    started = time.process_time()
    for folder in tqdm(scene_dirs(settings), desc="scenes", unit="scene"):
        if (folder / GROUND_TRUTH_FILE).is_file():
            content = load_ground_truth(folder).layout.content
            if content != settings.scene_content:
                raise SystemExit(f"{folder} holds a {content!r} scene, not {settings.scene_content!r}: choose another --work")
        else:
            seed = int(folder.name.split("_")[1])
            build_scene(folder, seed=seed, width=settings.width, height=settings.height, overwrite=True,
                        log=lambda message: None, sfm=False, content=settings.scene_content)  # fmt: skip
    record(settings, f"scenes{_shard_suffix(settings)}", {}, add_cpu_seconds=time.process_time() - started)


def curate_pairs(settings: Settings) -> None:
    from difix3d.data.curation import GROUND_TRUTH, CurateConfig, curate

    # This process's share of the scenes, less those already curated: a scene curated by an earlier
    # version of the engine keeps its pairs (its manifest records the settings it was made with).
    pairs = settings.work / "pairs"
    scenes = [folder for folder in scene_dirs(settings) if not (pairs / folder.name / f"{GROUND_TRUTH}.json").is_file()]
    if not scenes:
        return
    started = time.process_time()
    result = curate(CurateConfig(scene=scenes, out=pairs, strategies=("ground-truth",), ground_truth_steps=settings.steps_3dgs,
                                 test_fraction=TEST_FRACTION))  # fmt: skip
    record(settings, f"pairs{_shard_suffix(settings)}", {}, add_cpu_seconds=time.process_time() - started)
    if result.dataset is not None:
        log(f"dataset: {result.num_train} train / {result.num_test} test pairs")


def image_tensor(path: Path) -> torch.Tensor:
    """An 8-bit RGB(A) image file as [3, H, W] in [-1, 1]."""
    import imageio.v3 as iio
    import numpy as np

    return torch.from_numpy(np.ascontiguousarray(iio.imread(path)[..., :3])).permute(2, 0, 1).float() / 127.5 - 1


def scene_images(folders: list[Path]) -> torch.Tensor:
    """Every view of the given scene folders, [N, 3, H, W] in [-1, 1]."""
    files = sorted(path for folder in folders for path in (folder / "images").glob("*.png"))
    return torch.stack([image_tensor(path) for path in files])


def pair_images(settings: Settings, split: str, limit: int, exclude_scenes: set[str] = frozenset()) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(degraded renders, their truths) of up to `limit` pairs of the dataset's `split`, evenly spaced,
    each [M, 3, H, W] in [-1, 1]; None before the pairs stage has written the dataset."""
    root = settings.work / "pairs"
    if not (root / "dataset.json").is_file():
        return None
    pairs = [pair for pair in json.loads((root / "dataset.json").read_text())[split].values() if pair["scene"] not in exclude_scenes]
    pairs = pairs[:: max(1, len(pairs) // limit)][:limit]
    return torch.stack([image_tensor(root / pair["image"]) for pair in pairs]), torch.stack([image_tensor(root / pair["target_image"]) for pair in pairs])


def train_autoencoder(settings: Settings) -> Path:
    """Stage 3, on the clean views of every scene; the last `AUTOENCODER_HELD_OUT_SCENES` scenes are
    held out for the PSNR check (the pairs are not needed, unless `autoencoder_degraded_skip_weight`
    asks for them: otherwise this can run while they are curated)."""
    from difix3d.metrics import psnr
    from difix3d.models.checkpoint import WEIGHTS_FILE, save_pretrained
    from difix3d.models.difix import Difix
    from difix3d.training.autoencoder import AutoencoderConfig, autoencoder_psnr, degraded_skip_psnr, pretrain_autoencoder

    folder = settings.work / "autoencoder"
    if (folder / WEIGHTS_FILE).is_file():
        return folder
    folders = scene_dirs(dataclasses.replace(settings, shard=None))
    images = {"train": scene_images(folders[:-AUTOENCODER_HELD_OUT_SCENES]),
              "test": scene_images(folders[-AUTOENCODER_HELD_OUT_SCENES:])}  # fmt: skip
    log(f"autoencoder: {len(images['train'])} clean training images, {len(images['test'])} held out")
    pairs = None
    if settings.autoencoder_degraded_skip_weight > 0:
        held_out_scenes = {folder.name for folder in folders[-AUTOENCODER_HELD_OUT_SCENES:]}
        pairs = pair_images(settings, "train", settings.autoencoder_pairs, exclude_scenes=held_out_scenes)
        if pairs is None:
            raise SystemExit("--autoencoder-degraded-skip-weight needs the pairs stage's dataset: run the pairs stage first")
        log(f"autoencoder: {len(pairs[0])} training pairs for the degraded-skip term")
    started = time.process_time()
    difix = Difix.from_config(settings.architecture)
    config = AutoencoderConfig(steps=settings.autoencoder_steps, learning_rate=settings.autoencoder_lr,
                               latent_only_weight=settings.autoencoder_latent_only_weight, unit_latent=settings.autoencoder_unit_latent,
                               degraded_skip_weight=settings.autoencoder_degraded_skip_weight)  # fmt: skip
    settings.work.mkdir(parents=True, exist_ok=True)
    pretrain_autoencoder(difix, images["train"], config, checkpoint=settings.work / "autoencoder_checkpoint.pt", checkpoint_every=50,
                         on_log=lambda step, loss: log(f"autoencoder step {step}: L2 {loss:.5f}"), pairs=pairs)  # fmt: skip
    held_out = autoencoder_psnr(difix, images["test"])
    latent_only = autoencoder_psnr(difix, images["test"], skips=False)
    log(f"autoencoder reproduces held-out images at {held_out:.2f} dB PSNR ({latent_only:.2f} dB from the latent alone)")
    # The ceiling a perfect UNet would reach with this decoder: held-out pairs decoded from their
    # truth's latent with their degraded render's skips, against the renders themselves.
    ceiling = {}
    test_pairs = pair_images(settings, "test", settings.eval_pairs)
    if test_pairs is not None:
        degraded, clean = test_pairs
        ceiling = {"held_out_pairs": len(clean), "held_out_pair_input_psnr": round(float(psnr((degraded + 1) / 2, (clean + 1) / 2).mean()), 2),
                   "held_out_degraded_skip_psnr": round(degraded_skip_psnr(difix, degraded, clean), 2)}  # fmt: skip
        log(f"held-out pairs: inputs {ceiling['held_out_pair_input_psnr']:.2f} dB; truth's latent with the input's skips "
            f"{ceiling['held_out_degraded_skip_psnr']:.2f} dB (a perfect UNet's ceiling)")
    save_pretrained(difix, folder)
    record(settings, "autoencoder", {
        "architecture": settings.architecture, "steps": settings.autoencoder_steps, "held_out_psnr": round(held_out, 2),
        "held_out_latent_only_psnr": round(latent_only, 2), "latent_only_weight": settings.autoencoder_latent_only_weight,
        "unit_latent": settings.autoencoder_unit_latent, "degraded_skip_weight": settings.autoencoder_degraded_skip_weight,
        **ceiling,
        "scaling_factor": difix.config.vae["scaling_factor"],
        "train_images": len(images["train"]), "held_out_images": len(images["test"]),
        "cpu_seconds": round(time.process_time() - started, 1),
    })  # fmt: skip
    return folder


def identity_start_folder(settings: Settings, autoencoder: Path) -> Path:
    """The Difix stage's starting point: the autoencoder stage's model, made to reproduce its input."""
    from difix3d.models.checkpoint import WEIGHTS_FILE, load_difix, save_pretrained
    from difix3d.training.autoencoder import identity_start

    folder = settings.work / "difix_start"
    if not (folder / WEIGHTS_FILE).is_file():
        save_pretrained(identity_start(load_difix(str(autoencoder), device="cpu")), folder)
    return folder


def train_difix(settings: Settings, dataset: Path, start: Path) -> None:
    """Stage 4. Run again with a larger `--difix-steps` (after more scenes were curated) to continue
    from the last checkpoint on the enlarged dataset; each run is recorded with its pairs."""
    from difix3d.training.finetune import TrainConfig, train

    folder = settings.work / settings.difix_run
    pairs = {split: len(found) for split, found in json.loads(dataset.read_text()).items()}  # train() checks the files
    started = time.process_time()
    result = train(
        TrainConfig(
            dataset=dataset, output=folder, model=str(start), steps=settings.difix_steps, crop_size=settings.crop,
            learning_rate=settings.difix_lr, unet_learning_rate=settings.difix_unet_lr, l2_form=settings.l2_form,
            lambda_l2=settings.lambda_l2, lambda_lpips=settings.lambda_lpips, lambda_gram=settings.lambda_gram,
            gram_warmup_steps=settings.gram_warmup_steps, lambda_latent=settings.lambda_latent, eval_every=1000, checkpoint_every=250, eval_max_pairs=settings.eval_pairs,
            resume=(folder / "checkpoints").is_dir(),
        )
    )  # fmt: skip
    runs = json.loads((settings.work / "record.json").read_text()).get(settings.difix_run, {}).get("runs", [])
    runs.append({"steps": [result.first_step, result.final_step], "pairs": pairs,
                 "cpu_seconds": round(time.process_time() - started, 1)})  # fmt: skip
    record(settings, settings.difix_run, {"steps": result.final_step, "evaluations": result.evaluations, "runs": runs,
                               "cpu_seconds": round(sum(run["cpu_seconds"] for run in runs), 1)})  # fmt: skip


def _shard_suffix(settings: Settings) -> str:
    return "" if settings.shard is None else f"_shard_{settings.shard.replace('/', '_of_')}"


def main(settings: Settings) -> None:
    from difix3d.runtime import configure_cpu_runtime

    configure_cpu_runtime(settings.threads)
    if "scenes" in settings.stages:
        build_scenes(settings)
    if "pairs" in settings.stages:
        curate_pairs(settings)
    if settings.shard is not None:
        return  # the shared stages run in one process
    if "autoencoder" in settings.stages:
        train_autoencoder(settings)
    if "difix" in settings.stages:
        from difix3d.data.curation import assemble_dataset

        dataset = assemble_dataset(settings.work / "pairs", test_fraction=TEST_FRACTION)
        dataset_file = settings.work / "pairs" / "dataset.json"
        if settings.near_identity_repeats > 1 or settings.clean_identity_repeats > 0:
            dataset_file = write_identity_weighted(dataset, dataset_file, settings.near_identity_repeats, settings.clean_identity_repeats)
        start = identity_start_folder(settings, settings.work / "autoencoder")
        train_difix(settings, dataset_file, start)


def write_identity_weighted(dataset: dict, dataset_file: Path, near_identity_repeats: int, clean_identity_repeats: int) -> Path:
    """A copy of the dataset JSON (next to it, so its relative paths hold) whose training split lists
    every training-pose pair `near_identity_repeats` times and adds `clean_identity_repeats` copies of
    a clean pair per training pose (its truth as input and target, the same reference)."""
    from difix3d.data.ground_truth_pairs import TRAINING_VIEW_PREFIX

    train = dict(dataset["train"])
    for pair_id, pair in dataset["train"].items():
        if not pair.get("view", "").startswith(TRAINING_VIEW_PREFIX):
            continue
        train.update({f"{pair_id}#{copy}": pair for copy in range(2, near_identity_repeats + 1)})
        clean_id = f"{pair['scene']}/clean/{pair['view']}"
        clean = {**pair, "image": pair["target_image"], "variant": "clean", "step": None}
        train.update({f"{clean_id}#{copy}": clean for copy in range(1, clean_identity_repeats + 1)})
    suffix = f"_near_identity_x{near_identity_repeats}" + (f"_clean_x{clean_identity_repeats}" if clean_identity_repeats else "")
    weighted = dataset_file.with_name(f"{dataset_file.stem}{suffix}.json")
    weighted.write_text(json.dumps({**dataset, "train": train}, indent=1))
    return weighted


if __name__ == "__main__":
    main(tyro.cli(Settings))
