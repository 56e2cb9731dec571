"""Training pairs for Difix from your own COLMAP scenes: `difix3d curate`.

Each strategy reconstructs a scene in a way that degrades it, renders views whose clean photographs
exist, and pairs each render (input) with its photograph (target) and the nearest clean view the
degraded model saw, by `difix3d.core.poses.pose_distance` (reference; never the target itself):

- `sparse`: train on every n-th view (sorted by name), render the held-out views; reference: the
  nearest training view.
- `underfit`: train on all views, render all of them from the checkpoints at fractions of the
  schedule (25%, 50%, 75% by default); reference: the nearest other view.
- `cross`: split the cameras into groups (by COLMAP camera id when the model has several cameras,
  else k-means on camera centres), train on the largest group, render the others; reference: the
  nearest view of the training group.
- `cycle`: train on all views, render each pose shifted sideways (alternately right and left, by a
  multiple of the median distance between neighbouring cameras, since COLMAP's scale is arbitrary),
  train a second model on those renders alone, render the original poses; reference: the nearest
  other original view.
- `ground-truth` (procedural scenes from `difix3d scene` only): reconstruct with the in-process 3DGS
  fitter, render it at many novel poses and several points of its schedule, and pair the renders with
  the ray-traced truth at those poses (`difix3d.data.ground_truth_pairs`); needs no COLMAP model.

The reconstructions go through a `difix3d.data.reconstruction.Reconstructor` (`--reconstructor`): the
library's own 3DGS fitter (`splats`, the default), or nerfstudio's `difix3d-gs` with Difix off
(`nerfstudio`, from `nerfstudio_plugin`). For `sparse` and `cross` they keep only the 3D points seen
by two or more training views, so held-out views add no geometry.

Output folder OUT: `OUT/<scene>/images/` (copies of the targets and references used),
`OUT/<scene>/<strategy>/<variant>/<view>.png` (renders), `OUT/<scene>/<strategy>.json` (that
strategy's pairs and parameters: written when the strategy has finished, so a rerun skips it; a
scene is done when all selected strategies are) and `OUT/dataset.json`, the dataset for
`difix3d train`, rebuilt atomically from every strategy manifest in OUT at the end of each run
(of a sharded run: see below).
Its pairs carry extra keys: scene, strategy, variant, step (the training step of the model that
rendered the input, as the reconstructor counts), view, ref_view and the OpenCV camera-to-world
poses (COLMAP frame) of the target (`pose`) and reference (`ref_pose`), plus `shifted_pose` for `cycle`.
Test split rule (applied when dataset.json is built, so changing it needs no new renders): a target
view goes to "test" when a stable hash of "<scene>/<view>" falls below `test_fraction`, so all pairs
of a view share a split whatever the scene set or sharding.
With `--shard i/n` (job arrays; n processes, on one machine or several sharing OUT), shard i curates
scenes i, i+n, ... of the --scene list and writes only files of its own: its scenes' folders and
`OUT/shards/shard-i-of-n.json` (its scenes, the settings of the whole array, and whether it has
finished). Whichever shard finishes and then finds all n shard manifests finished, with the same
scene list and settings, builds `dataset.json`; every strategy manifest is complete by then, so
shards that finish together write the same file. A shard killed midway is rerun as it was (finished
strategies are skipped). Running once more without `--shard` (everything is skipped) also rebuilds
`dataset.json`, e.g. after changing the test fraction.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
import tyro
from tqdm.auto import tqdm

from difix3d.core.poses import pairwise_pose_distance
from difix3d.errors import Difix3DError
from difix3d.files import atomic_write_bytes
from difix3d.models.ids import PROMPT
# SceneViews, load_scene and scene_id are used here and re-exported (curation's API before they moved).
from difix3d.data.reconstruction import Reconstructor, SceneViews, TrainingViews, load_scene, scene_id  # noqa: F401

Strategy = Literal["sparse", "underfit", "cross", "cycle", "ground-truth"]
GROUND_TRUTH = "ground-truth"
DATASET_FILE = "dataset.json"
SHARDS_FOLDER = "shards"
# A manifest without a recorded reconstructor was made when nerfstudio was the only one.
_RECORDED_BEFORE_CHOICE = "nerfstudio"


@dataclass
class CurateConfig:
    """Settings of `difix3d curate`."""

    scene: Annotated[list[Path], tyro.conf.UseAppendAction]
    """COLMAP scene folder with images/ and sparse/0 (repeat --scene for several); for the
    ground-truth strategy, a procedural scene made by `difix3d scene` (its ground_truth.json)."""
    out: Path
    """Output folder: renders, copies of targets and references, manifests and dataset.json."""
    strategies: tuple[Strategy, ...] = ("sparse", "underfit", "cross", "cycle")
    """Degradations to curate."""
    steps: int = 30_000
    """Training steps of a full reconstruction (the "normal schedule")."""
    sparse_every: int = 4
    """sparse: train on every n-th view, render the others."""
    underfit_fractions: tuple[float, ...] = (0.25, 0.5, 0.75)
    """underfit: render the checkpoints at these fractions of --steps."""
    cross_group_by: Literal["auto", "camera", "kmeans"] = "auto"
    """cross: group views by COLMAP camera id, by k-means on camera centres, or "auto" (camera id
    when the model has several cameras, else k-means)."""
    cross_groups: int = 2
    """cross: number of k-means groups."""
    cycle_shift: float = 1.0
    """cycle: sideways shift, in median distances between neighbouring cameras."""
    ground_truth_steps: int = 1000
    """ground-truth: 3DGS steps of the reconstruction (the quality benchmark's schedule); renders are
    taken at 40%, 70% and 100% of it."""
    ground_truth_extreme: int = 12
    """ground-truth: extreme target poses per scene (each with two poses on the way to it)."""
    ground_truth_wide: int = 10
    """ground-truth: poses anywhere around the scene per scene."""
    ground_truth_training_views: bool = True
    """ground-truth: also pair renders at the training poses with their images (near-identity pairs)."""
    test_fraction: float = 0.1
    """Fraction of target views (by a stable hash) whose pairs go to the test split."""
    shard: str | None = None
    """"i/n": process only scenes i, i+n, i+2n, ... (0-based), e.g. one job of an array of n."""
    overwrite: bool = False
    """Redo the selected strategies of the selected scenes even when finished."""
    reconstructor: Literal["splats", "nerfstudio"] = "splats"
    """How scenes are reconstructed: the library's 3DGS fitter (`difix3d.rendering.gaussians`; undistorted
    cameras only), or nerfstudio's `difix3d-gs` method with Difix off (plain Splatfacto)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """The reconstructor's device ("auto": CUDA when available)."""
    downscale_factor: int = 1
    """Train and render at 1/f resolution; f > 1 needs the scene's images_<f>/ folder."""
    keep_work: bool = False
    """Keep the reconstructors' working files (OUT/<scene>/work/) after a strategy finishes."""


@dataclass
class Render:
    """One degraded render of a clean view, before it becomes a pair."""

    view: str
    path: Path
    step: int
    variant: str
    references: list[str]  # the clean views it may take its reference from
    shifted_pose: list | None = None


@dataclass
class CurateResult:
    """What a run did."""

    dataset: Path | None  # None: other shards of the array have not finished yet
    curated: list[tuple[str, str]] = field(default_factory=list)  # (scene, strategy) run now
    skipped: list[tuple[str, str]] = field(default_factory=list)  # already finished
    num_train: int = 0
    num_test: int = 0
    waiting_for: list[str] = field(default_factory=list)  # unfinished shards ("i/n")


# ------------------------------------------------------------------------------------ public API


def curate(config: CurateConfig, reconstructor: Reconstructor | None = None) -> CurateResult:
    """Curate the scenes of `config` (this shard's), then rebuild OUT/dataset.json from all manifests
    (with --shard: only once every shard of the array has finished).

    `reconstructor`: how to reconstruct scenes (default: the one `config.reconstructor` names, made
    when the first strategy needs it)."""
    _check_config(config)
    shard_index, num_shards = parse_shard(config.shard)
    # IDs of the whole list: two shards must never write the same scene folder.
    all_ids = [scene_id(Path(path)) for path in config.scene]
    duplicated = sorted({name for name in all_ids if all_ids.count(name) > 1})
    if duplicated:
        raise Difix3DError(f"scene IDs are folder names and must be unique; repeated: {', '.join(duplicated)}")
    scene_dirs = [Path(path) for path in config.scene[shard_index::num_shards]]
    # The ground-truth strategy needs no COLMAP model: its scenes know their true poses.
    uses_colmap = bool(set(config.strategies) - {GROUND_TRUTH})
    scenes = [load_scene(path) if uses_colmap else SceneViews(path, [], np.zeros((0, 4, 4)), []) for path in scene_dirs]

    out = Path(config.out)
    result = CurateResult(dataset=out / DATASET_FILE)
    array = _array_settings(config, all_ids)
    if num_shards > 1:
        _write_shard_manifest(out, shard_index, num_shards, array, [s.id for s in scenes], finished=False)
    jobs = []
    # Finished strategies are checked before any training, so a mismatch fails fast.
    for scene in scenes:
        for strategy in dict.fromkeys(config.strategies):
            manifest = out / scene.id / f"{strategy}.json"
            if manifest.is_file() and not config.overwrite:
                recorded = json.loads(manifest.read_text())["parameters"]
                if strategy != GROUND_TRUTH:
                    recorded.setdefault("reconstructor", _RECORDED_BEFORE_CHOICE)
                if recorded != strategy_parameters(config, strategy):
                    raise Difix3DError(
                        f"{manifest} was curated with {recorded}, not {strategy_parameters(config, strategy)}; "
                        "pass --overwrite to redo it"
                    )
                result.skipped.append((scene.id, strategy))
            else:
                jobs.append((scene, strategy))

    progress = tqdm(jobs, desc="curate", unit="strategy", dynamic_ncols=True)
    for scene, strategy in progress:
        progress.set_postfix_str(f"{scene.id}/{strategy}")
        # Leftovers of an interrupted or overwritten attempt go first.
        for stale in (out / scene.id / "work" / strategy, out / scene.id / strategy):
            if stale.exists():
                shutil.rmtree(stale)
        if strategy == GROUND_TRUTH:
            from difix3d.data.ground_truth_pairs import curate_ground_truth_scene

            pairs = curate_ground_truth_scene(scene.root, out, ground_truth_config(config), progress=False)
        else:
            reconstructor = reconstructor or make_reconstructor(config)
            work = out / scene.id / "work" / strategy
            renders = _STRATEGIES[strategy](scene, work, config, reconstructor)
            pairs = make_pairs(scene, strategy, renders, out)
            if not config.keep_work:
                shutil.rmtree(work)
                if not any(work.parent.iterdir()):
                    work.parent.rmdir()
        write_manifest(out / scene.id / f"{strategy}.json", strategy_parameters(config, strategy), pairs)
        result.curated.append((scene.id, strategy))
    progress.close()

    if num_shards > 1:
        _write_shard_manifest(out, shard_index, num_shards, array, [s.id for s in scenes], finished=True)
        result.waiting_for = unfinished_shards(out, num_shards, array)
        if result.waiting_for:
            result.dataset = None
            return result
    dataset = assemble_dataset(out, config.test_fraction)
    result.num_train, result.num_test = len(dataset["train"]), len(dataset["test"])
    return result


def curate_command(config: Annotated[CurateConfig, tyro.conf.OmitArgPrefixes]) -> None:
    """Curate (degraded render, clean target, reference) pairs from COLMAP scenes for `difix3d train`.

    Reconstructs each scene in degraded ways (with the library's 3DGS fitter, or nerfstudio's
    `difix3d-gs` with Difix off) and pairs renders with the photographs; see difix3d/data/curation.py for
    the strategies and the output layout.
    """
    result = curate(config)
    done = f"curated {len(result.curated)} scene strategies, skipped {len(result.skipped)} finished; "
    if result.dataset is None:
        print(done + f"{DATASET_FILE} is written by the last shard to finish (waiting for {', '.join(result.waiting_for)})")
    else:
        print(done + f"{result.dataset}: {result.num_train} train / {result.num_test} test pairs")


def parse_shard(spec: str | None) -> tuple[int, int]:
    """"i/n" -> (i, n) with 0 <= i < n; None -> (0, 1)."""
    if spec is None:
        return 0, 1
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
    if not match or not int(match[1]) < int(match[2]):
        raise Difix3DError(f"--shard must be i/n with 0 <= i < n (e.g. 0/4), got {spec!r}")
    return int(match[1]), int(match[2])


def make_reconstructor(config: CurateConfig) -> Reconstructor:
    """The reconstructor `config` names, on its device."""
    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if config.reconstructor == "nerfstudio":
        # Imported only when chosen: the library itself never needs nerfstudio.
        from nerfstudio_plugin.reconstructor import NerfstudioReconstructor

        return NerfstudioReconstructor(device)
    from difix3d.data.reconstruction import SplatReconstructor

    return SplatReconstructor(device)


def strategy_parameters(config: CurateConfig, strategy: str) -> dict:
    """The settings a strategy's result depends on (recorded in its manifest)."""
    if strategy == GROUND_TRUTH:
        return json.loads(json.dumps(dataclasses.asdict(ground_truth_config(config))))  # tuples as JSON lists
    own = {
        "sparse": {"sparse_every": config.sparse_every},
        "underfit": {"underfit_fractions": list(config.underfit_fractions)},
        "cross": {"cross_group_by": config.cross_group_by, "cross_groups": config.cross_groups},
        "cycle": {"cycle_shift": config.cycle_shift},
    }[strategy]
    return {"reconstructor": config.reconstructor, "steps": config.steps, "downscale_factor": config.downscale_factor, **own}


def ground_truth_config(config: CurateConfig):
    """The ground-truth data engine's settings (`difix3d.data.ground_truth_pairs`) from `difix3d curate`'s."""
    from difix3d.data.ground_truth_pairs import GroundTruthPairsConfig

    steps = config.ground_truth_steps
    return GroundTruthPairsConfig(
        steps=steps, snapshot_steps=tuple(sorted({max(1, round(steps * f)) for f in (0.4, 0.7, 1.0)})),
        num_extreme=config.ground_truth_extreme, num_wide=config.ground_truth_wide,
        training_views=config.ground_truth_training_views,
    )  # fmt: skip


# ------------------------------------------------------------------------------ view selection


def sparse_split(names: Sequence[str], every: int) -> tuple[list[str], list[str]]:
    """(training views, held-out views): every `every`-th of the sorted names, from the first, trains."""
    ordered = sorted(names)
    train = ordered[::every]
    return train, [name for name in ordered if name not in set(train)]


def underfit_steps(steps: int, fractions: Sequence[float]) -> list[int]:
    """The checkpoint steps at `fractions` of a `steps`-long schedule, sorted and distinct."""
    return sorted({max(1, round(fraction * steps)) for fraction in fractions})


def kmeans(points: np.ndarray, k: int, iterations: int = 100) -> np.ndarray:
    """Cluster labels [N] of `points` [N, D] by Lloyd's k-means, deterministically initialised by
    farthest-point sampling from the point farthest from the mean."""
    points = np.asarray(points, dtype=np.float64)
    first = int(np.argmax(np.linalg.norm(points - points.mean(axis=0), axis=1)))
    chosen = [first]
    for _ in range(1, k):
        distance = np.min(np.linalg.norm(points[:, None] - points[chosen][None], axis=-1), axis=1)
        chosen.append(int(np.argmax(distance)))
    centres = points[chosen]
    labels = np.full(len(points), -1)
    for _ in range(iterations):
        new_labels = np.argmin(np.linalg.norm(points[:, None] - centres[None], axis=-1), axis=1)
        if np.array_equal(new_labels, labels):
            break
        labels = new_labels
        centres = np.stack([points[labels == g].mean(axis=0) if np.any(labels == g) else centres[g] for g in range(k)])
    return labels


def camera_groups(scene: SceneViews, group_by: str, num_groups: int) -> list[list[str]]:
    """Views grouped by COLMAP camera id or by k-means on camera centres, largest group first."""
    if group_by == "auto":
        group_by = "camera" if len(set(scene.camera_ids)) > 1 else "kmeans"
    if group_by == "camera":
        if len(set(scene.camera_ids)) < 2:
            raise Difix3DError(f"scene {scene.id}: --cross-group-by camera needs several COLMAP cameras, it has one")
        labels = np.asarray(scene.camera_ids)
    else:
        labels = kmeans(scene.poses[:, :3, 3], num_groups)
    groups = [[name for name, label in zip(scene.names, labels) if label == value] for value in np.unique(labels)]
    groups = [group for group in groups if group]
    if len(groups) < 2:
        raise Difix3DError(f"scene {scene.id}: the cameras form a single group; nothing to cross-render")
    return sorted(groups, key=len, reverse=True)


def neighbour_spacing(centres: np.ndarray) -> float:
    """Median distance from each camera centre [N, 3] to its nearest other centre."""
    distance = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
    np.fill_diagonal(distance, np.inf)
    return float(np.median(distance.min(axis=1)))


def shift_sideways(camera_to_world: np.ndarray, offset: float) -> np.ndarray:
    """The OpenCV camera-to-world pose moved `offset` along its own x axis (right; left if negative)."""
    shifted = np.array(camera_to_world, dtype=np.float64)
    shifted[:3, 3] += offset * shifted[:3, 0]
    return shifted


def nearest_references(scene: SceneViews, views: Sequence[str], candidates: Sequence[str]) -> list[str]:
    """For each view, the nearest candidate view other than itself, by the combined pose distance."""
    candidates = list(candidates)
    distance = pairwise_pose_distance(
        torch.from_numpy(scene.poses[scene.index(views)]), torch.from_numpy(scene.poses[scene.index(candidates)])
    )
    for row, view in enumerate(views):
        if view in candidates:
            distance[row, candidates.index(view)] = math.inf
    if torch.isinf(distance.min(dim=1).values).any():
        raise Difix3DError(f"scene {scene.id}: a view has no reference view besides itself")
    return [candidates[int(column)] for column in distance.argmin(dim=1)]


def is_test_view(scene_id: str, view: str, fraction: float) -> bool:
    """Whether a target view's pairs go to the test split (a stable hash of "<scene>/<view>")."""
    digest = hashlib.blake2b(f"{scene_id}/{view}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


# -------------------------------------------------------------------------------- strategies


def _sparse(scene: SceneViews, work: Path, config: CurateConfig, reconstructor: Reconstructor) -> list[Render]:
    train, held_out = sparse_split(scene.names, config.sparse_every)
    if len(train) < 2 or not held_out:
        raise Difix3DError(
            f"scene {scene.id}: --sparse-every {config.sparse_every} over {len(scene.names)} views leaves "
            f"{len(train)} training and {len(held_out)} held-out views; need at least 2 and 1"
        )
    views = TrainingViews(scene, train, held_out, points_from=train, downscale_factor=config.downscale_factor)
    files = reconstructor.render(reconstructor.train(views, work / "sparse", config.steps), held_out)
    variant = f"every{config.sparse_every}"
    return [Render(view, files[view], config.steps, variant, train) for view in held_out]


def _underfit(scene: SceneViews, work: Path, config: CurateConfig, reconstructor: Reconstructor) -> list[Render]:
    steps = underfit_steps(config.steps, config.underfit_fractions)
    views = TrainingViews(scene, scene.names, scene.names, downscale_factor=config.downscale_factor)
    reconstruction = reconstructor.train(views, work / "underfit", steps[-1], checkpoint_steps=steps)
    renders = []
    for step in steps:
        files = reconstructor.render(reconstruction, scene.names, step)
        renders += [Render(view, files[view], step, f"step{step:06d}", scene.names) for view in scene.names]
    return renders


def _cross(scene: SceneViews, work: Path, config: CurateConfig, reconstructor: Reconstructor) -> list[Render]:
    groups = camera_groups(scene, config.cross_group_by, config.cross_groups)
    train, others = groups[0], sorted(name for group in groups[1:] for name in group)
    views = TrainingViews(scene, train, others, points_from=train, downscale_factor=config.downscale_factor)
    files = reconstructor.render(reconstructor.train(views, work / "cross", config.steps), others)
    return [Render(view, files[view], config.steps, f"groups{len(groups)}", train) for view in others]


def _cycle(scene: SceneViews, work: Path, config: CurateConfig, reconstructor: Reconstructor) -> list[Render]:
    offset = config.cycle_shift * neighbour_spacing(scene.poses[:, :3, 3])
    shifted = {
        name: shift_sideways(pose, offset if number % 2 == 0 else -offset)
        for number, (name, pose) in enumerate(zip(scene.names, scene.poses))
    }
    shifted_names = {name: _shifted_name(name) for name in scene.names}

    # First model: the originals; it renders the shifted poses (added as views whose image files are
    # placeholders of the training resolution, never read as targets).
    folder = scene.root / ("images" if config.downscale_factor == 1 else f"images_{config.downscale_factor}")
    placeholders = {shifted_names[name]: (folder / name, shifted[name]) for name in scene.names}
    first_views = TrainingViews(scene, scene.names, list(placeholders), extra_views=placeholders,
                                downscale_factor=config.downscale_factor)  # fmt: skip
    first = reconstructor.train(first_views, work / "cycle_first", config.steps)
    shifted_renders = reconstructor.render(first, list(placeholders))

    # Second model: the shifted renders alone; renders the original poses.
    renders_as_views = {shifted_names[name]: (shifted_renders[shifted_names[name]], shifted[name]) for name in scene.names}
    second_views = TrainingViews(scene, list(renders_as_views), scene.names, extra_views=renders_as_views,
                                 downscale_factor=config.downscale_factor)  # fmt: skip
    second = reconstructor.train(second_views, work / "cycle_second", config.steps)
    files = reconstructor.render(second, scene.names)
    variant = f"shift{config.cycle_shift:g}"
    return [
        Render(view, files[view], config.steps, variant, scene.names, _pose_list(shifted[view]))
        for view in scene.names
    ]


def _shifted_name(name: str) -> str:
    # Views are known by name, so the shifted ones need names of their own; renders are PNG whatever
    # the photographs' format.
    return str(Path(name).with_name(f"cycle_shifted_{Path(name).stem}.png"))


_STRATEGIES = {"sparse": _sparse, "underfit": _underfit, "cross": _cross, "cycle": _cycle}
# Manifests that `assemble_dataset` reads: these strategies and the ground-truth data engine's
# (`difix3d.data.ground_truth_pairs`, procedural scenes only).
_MANIFEST_NAMES = (*_STRATEGIES, GROUND_TRUTH)


# ---------------------------------------------------------------------------- pairs and dataset


def make_pairs(scene: SceneViews, strategy: str, renders: list[Render], out: Path) -> list[dict]:
    """Move renders into OUT/<scene>/<strategy>/<variant>/, copy targets and references into
    OUT/<scene>/images/, and describe each pair (paths relative to OUT)."""
    reference_of: dict[tuple, str] = {}
    for pool in {tuple(render.references) for render in renders}:
        views = sorted({render.view for render in renders if tuple(render.references) == pool})
        reference_of.update({(pool, view): ref for view, ref in zip(views, nearest_references(scene, views, pool))})

    pairs = []
    for render in renders:
        reference = reference_of[tuple(render.references), render.view]
        image = out / scene.id / strategy / render.variant / Path(render.view).with_suffix(".png")
        image.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(render.path, image)
        target, ref = (_copy_clean(scene, view, out) for view in (render.view, reference))
        pair = {
            "id": f"{scene.id}/{strategy}/{render.variant}/{Path(render.view).with_suffix('')}",
            "image": image.relative_to(out).as_posix(),
            "target_image": target,
            "ref_image": ref,
            "prompt": PROMPT,
            "scene": scene.id,
            "strategy": strategy,
            "variant": render.variant,
            "step": render.step,
            "view": render.view,
            "ref_view": reference,
            "pose": _pose_list(scene.poses[scene.index([render.view])[0]]),
            "ref_pose": _pose_list(scene.poses[scene.index([reference])[0]]),
        }
        if render.shifted_pose is not None:
            pair["shifted_pose"] = render.shifted_pose
        pairs.append(pair)
    return pairs


def write_manifest(path: Path, parameters: dict, pairs: list[dict]) -> None:
    """A strategy's finished manifest for one scene (atomically: its presence means done)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, _dumps_rows({"parameters": parameters, "pairs": pairs}).encode())


def assemble_dataset(out: Path, test_fraction: float) -> dict:
    """Write OUT/dataset.json (atomically) from every strategy manifest under OUT; returns it.
    The split of each pair follows `is_test_view` of its target view."""
    dataset: dict[str, dict] = {"train": {}, "test": {}}
    for manifest in sorted(out.glob("*/*.json")):
        if manifest.stem not in _MANIFEST_NAMES:
            continue
        for pair in json.loads(manifest.read_text())["pairs"]:
            split = "test" if is_test_view(pair["scene"], pair["view"], test_fraction) else "train"
            dataset[split][pair["id"]] = {key: value for key, value in pair.items() if key != "id"}
    atomic_write_bytes(out / DATASET_FILE, _dumps_rows(dataset).encode())
    return dataset


def shard_manifest_path(out: Path, shard_index: int, num_shards: int) -> Path:
    return out / SHARDS_FOLDER / f"shard-{shard_index}-of-{num_shards}.json"


def unfinished_shards(out: Path, num_shards: int, array: dict) -> list[str]:
    """The shards ("i/n") of this array that have not finished: no manifest, an unfinished one, or
    one of a run with other scenes or settings."""
    waiting = []
    for index in range(num_shards):
        path = shard_manifest_path(out, index, num_shards)
        try:
            manifest = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            manifest = {}
        if not (manifest.get("finished") and manifest.get("array") == array):
            waiting.append(f"{index}/{num_shards}")
    return waiting


def _array_settings(config: CurateConfig, scene_ids: list[str]) -> dict:
    """What every shard of one job array must share (recorded in each shard manifest)."""
    strategies = list(dict.fromkeys(config.strategies))
    return {
        "scenes": scene_ids,
        "parameters": {strategy: strategy_parameters(config, strategy) for strategy in strategies},
        "test_fraction": config.test_fraction,
    }


def _write_shard_manifest(out: Path, index: int, num_shards: int, array: dict, scenes: list[str], finished: bool) -> None:
    document = {"shard": f"{index}/{num_shards}", "finished": finished, "scenes": scenes, "array": array}
    atomic_write_bytes(shard_manifest_path(out, index, num_shards), (json.dumps(document, indent=1) + "\n").encode())


def _dumps_rows(document: dict) -> str:
    """JSON with one line per element of the document's top-level objects and lists (one per pair)."""
    parts = []
    for key, value in document.items():
        if isinstance(value, dict) and value:
            rows = ",\n".join(f"  {json.dumps(name)}: {json.dumps(item)}" for name, item in value.items())
            parts.append(f"{json.dumps(key)}: {{\n{rows}\n }}")
        elif isinstance(value, list) and value:
            rows = ",\n".join(f"  {json.dumps(item)}" for item in value)
            parts.append(f"{json.dumps(key)}: [\n{rows}\n ]")
        else:
            parts.append(f"{json.dumps(key)}: {json.dumps(value)}")
    return "{\n " + ",\n ".join(parts) + "\n}\n"


def _copy_clean(scene: SceneViews, view: str, out: Path) -> str:
    destination = out / scene.id / "images" / view
    if not destination.is_file():
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(scene.image_path(view), destination)
    return destination.relative_to(out).as_posix()


def _pose_list(pose: np.ndarray) -> list[list[float]]:
    return [[round(float(value), 6) for value in row] for row in pose]


def _check_config(config: CurateConfig) -> None:
    if not config.scene:
        raise Difix3DError("give at least one --scene")
    if not config.strategies:
        raise Difix3DError("give at least one strategy (--strategies sparse underfit cross cycle)")
    if config.steps < 4:
        raise Difix3DError(f"--steps must be at least 4, got {config.steps}")
    if config.sparse_every < 2:
        raise Difix3DError(f"--sparse-every must be at least 2, got {config.sparse_every}")
    if not config.underfit_fractions or not all(0 < f < 1 for f in config.underfit_fractions):
        raise Difix3DError(f"--underfit-fractions must lie in (0, 1), got {list(config.underfit_fractions)}")
    if config.cross_groups < 2:
        raise Difix3DError(f"--cross-groups must be at least 2, got {config.cross_groups}")
    if not config.cycle_shift > 0:
        raise Difix3DError(f"--cycle-shift must be positive, got {config.cycle_shift}")
    if not 0 <= config.test_fraction < 1:
        raise Difix3DError(f"--test-fraction must lie in [0, 1), got {config.test_fraction}")
    if config.downscale_factor < 1:
        raise Difix3DError(f"--downscale-factor must be at least 1, got {config.downscale_factor}")
