"""`difix3d curate`: view selection, derived scenes, the strategies with a stand-in reconstructor,
resume rules, and end-to-end runs with real reconstructors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pycolmap
import pytest

from difix3d.cli import main
from difix3d.data import curation
from difix3d.data.curation import CurateConfig, SceneViews
from difix3d.data.reconstruction import TrainingViews, write_colmap_scene
from difix3d.data.sfm import camera_to_world
from difix3d.errors import Difix3DError
from fake_reconstructor import FakeReconstructor


def fake_scene(centres, camera_ids=None) -> SceneViews:
    poses = np.tile(np.eye(4), (len(centres), 1, 1))
    poses[:, :3, 3] = centres
    names = [f"view_{i:02d}.png" for i in range(len(centres))]
    return SceneViews(Path("/nowhere/fake"), names, poses, camera_ids or [1] * len(centres))


def cli_error(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["curate", *args])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------ view selection


def test_parse_shard():
    assert curation.parse_shard(None) == (0, 1)
    assert curation.parse_shard("2/5") == (2, 5)
    for bad in ("5/5", "1", "a/b", "-1/3", "1/0"):
        with pytest.raises(Difix3DError, match="--shard"):
            curation.parse_shard(bad)


def test_sparse_split_trains_on_every_nth_sorted_view():
    names = [f"img_{i}.png" for i in (3, 0, 5, 1, 4, 2, 6)]
    train, held_out = curation.sparse_split(names, 3)
    assert train == ["img_0.png", "img_3.png", "img_6.png"]
    assert held_out == ["img_1.png", "img_2.png", "img_4.png", "img_5.png"]


def test_underfit_steps_are_fractions_of_the_schedule():
    assert curation.underfit_steps(1000, (0.75, 0.25, 0.5, 0.5)) == [250, 500, 750]
    assert curation.underfit_steps(4, (0.1,)) == [1]


def test_kmeans_separates_clusters_deterministically():
    rng = np.random.default_rng(0)
    points = np.concatenate([rng.normal(0, 0.1, (6, 3)), rng.normal(5, 0.1, (4, 3))])
    labels = curation.kmeans(points, 2)
    assert len(set(labels[:6])) == 1 and len(set(labels[6:])) == 1 and labels[0] != labels[6]
    assert np.array_equal(labels, curation.kmeans(points, 2))


def test_camera_groups_by_id_or_kmeans():
    centres = [[0, 0, 0], [0.1, 0, 0], [0.2, 0, 0], [9, 0, 0], [9.1, 0, 0]]
    rig = fake_scene(centres, camera_ids=[1, 2, 1, 2, 1])
    assert curation.camera_groups(rig, "auto", 2) == [
        ["view_00.png", "view_02.png", "view_04.png"],
        ["view_01.png", "view_03.png"],
    ]
    single = fake_scene(centres)
    assert curation.camera_groups(single, "auto", 2) == [
        ["view_00.png", "view_01.png", "view_02.png"],
        ["view_03.png", "view_04.png"],
    ]
    with pytest.raises(Difix3DError, match="several COLMAP cameras"):
        curation.camera_groups(single, "camera", 2)


def test_shift_sideways_moves_along_the_camera_x_axis():
    pose = np.eye(4)
    pose[:3, :3] = [[0, 0, 1], [1, 0, 0], [0, 1, 0]]  # camera x axis = world y
    pose[:3, 3] = [1, 2, 3]
    shifted = curation.shift_sideways(pose, -0.5)
    np.testing.assert_allclose(shifted[:3, 3], [1, 1.5, 3])
    np.testing.assert_array_equal(shifted[:3, :3], pose[:3, :3])
    assert curation.neighbour_spacing(np.array([[0, 0, 0], [1, 0, 0], [3, 0, 0.0]])) == 1.0


def test_nearest_reference_is_never_the_target():
    scene = fake_scene([[0, 0, 0], [1, 0, 0], [1.2, 0, 0], [5, 0, 0]])
    assert curation.nearest_references(scene, scene.names, scene.names) == [
        "view_01.png", "view_02.png", "view_01.png", "view_02.png",
    ]  # fmt: skip
    assert curation.nearest_references(scene, ["view_03.png"], ["view_00.png", "view_01.png"]) == ["view_01.png"]


def test_test_split_is_a_stable_fraction_of_views():
    chosen = [curation.is_test_view("scene", f"view_{i}.png", 0.25) for i in range(400)]
    assert 70 < sum(chosen) < 130
    assert chosen == [curation.is_test_view("scene", f"view_{i}.png", 0.25) for i in range(400)]
    assert not any(curation.is_test_view("scene", f"view_{i}.png", 0.0) for i in range(50))


def test_rendered_file_follows_ns_render_naming(tmp_path):
    from nerfstudio_plugin.reconstructor import rendered_file

    assert rendered_file(tmp_path, "test", ["a.jpg", "b.jpg"], "b.jpg") == tmp_path / "test/rgb/b.png"
    assert rendered_file(tmp_path, "test", ["cam/a.jpg", "cam/b.jpg"], "cam/a.jpg") == tmp_path / "test/rgb/a.png"
    # One image: its own path is the common path, and ns-render writes <split>/rgb.png.
    assert rendered_file(tmp_path, "test", ["a.jpg"], "a.jpg") == tmp_path / "test/rgb.png"


# ------------------------------------------------------------------------------ derived scenes


def test_derived_scene_splits_filters_points_and_adds_views(tiny_scene, tmp_path):
    from nerfstudio_plugin.reconstructor import write_nerfstudio_scene

    scene = curation.load_scene(tiny_scene)
    train, held_out = curation.sparse_split(scene.names, 4)
    new_pose = curation.shift_sideways(scene.poses[0], 0.3)
    extra = {"shifted.png": (scene.image_path(scene.names[0]), new_pose)}
    derived = write_nerfstudio_scene(TrainingViews(scene, train, held_out, train, extra), tmp_path / "derived")

    assert (derived / "train_list.txt").read_text().split() == train
    assert (derived / "test_list.txt").read_text().split() == held_out
    assert (derived / "val_list.txt").read_text().split() == held_out
    for name in scene.names:
        assert (derived / "images" / name).resolve() == scene.image_path(name).resolve()

    model = pycolmap.Reconstruction(str(derived / "sparse" / "0"))
    original = pycolmap.Reconstruction(str(tiny_scene / "sparse" / "0"))
    train_ids = {model.find_image_with_name(name).image_id for name in train}
    assert 0 < model.num_points3D() < original.num_points3D()
    for point in model.points3D.values():
        assert len({element.image_id for element in point.track.elements} & train_ids) >= 2
    added = model.find_image_with_name("shifted.png")
    np.testing.assert_allclose(camera_to_world(added), new_pose, atol=1e-9)
    assert added.camera_id == model.find_image_with_name(scene.names[0]).camera_id
    assert (derived / "images" / "shifted.png").is_file()


def test_nerfstudio_reads_the_added_view_where_it_was_put(tiny_scene, tmp_path):
    from nerfstudio.data.dataparsers.colmap_dataparser import ColmapDataParserConfig

    scene = curation.load_scene(tiny_scene)
    original = scene.names[0]
    extra = {"shifted.png": (scene.image_path(original), curation.shift_sideways(scene.poses[0], 0.3))}
    derived = write_colmap_scene(TrainingViews(scene, scene.names, [original, "shifted.png"], None, extra), tmp_path / "derived")
    (derived / "test_list.txt").write_text(f"{original}\nshifted.png\n")
    parser = ColmapDataParserConfig(data=derived, colmap_path=Path("sparse/0"), downscale_factor=1).setup()
    outputs = parser.get_dataparser_outputs("test")
    assert [path.name for path in outputs.image_filenames] == [original, "shifted.png"]
    before, after = outputs.cameras.camera_to_worlds.double().numpy()
    np.testing.assert_allclose(after[:, :3], before[:, :3], atol=1e-6)
    # nerfstudio's camera x axis is OpenCV's: the view moved right by 0.3 COLMAP units.
    np.testing.assert_allclose(after[:, 3] - before[:, 3], 0.3 * outputs.dataparser_scale * before[:, 0], atol=1e-5)


# ------------------------------------------------------------- strategies, with a stand-in reconstructor


def curate_with(reconstructor, scene_dir: Path, out: Path, strategy: str, **settings) -> list[dict]:
    """Curate one strategy of one scene; its pairs, after checking what every pair must satisfy."""
    curation.curate(CurateConfig(scene=[scene_dir], out=out, strategies=(strategy,), **settings), reconstructor)
    pairs = json.loads((out / scene_dir.name / f"{strategy}.json").read_text())["pairs"]
    assert pairs and not (out / scene_dir.name / "work").exists()
    for pair in pairs:
        image, target, ref = (iio.imread(out / pair[key]) for key in ("image", "target_image", "ref_image"))
        assert image.shape[:2] == target.shape[:2] == ref.shape[:2]
        assert pair["ref_view"] != pair["view"] and pair["strategy"] == strategy
    return pairs


def test_sparse_trains_on_every_nth_view_and_renders_the_others(tiny_scene, tmp_path):
    fake, scene = FakeReconstructor(), curation.load_scene(tiny_scene)
    pairs = curate_with(fake, tiny_scene, tmp_path, "sparse", steps=40, sparse_every=3)
    train, held_out = curation.sparse_split(scene.names, 3)
    [run] = fake.runs
    assert (run.views.train, run.views.render, run.views.points_from, run.steps) == (train, held_out, train, 40)
    assert sorted(pair["view"] for pair in pairs) == held_out
    assert all(pair["ref_view"] in train and pair["step"] == 40 and pair["variant"] == "every3" for pair in pairs)


def test_underfit_renders_every_view_at_each_checkpoint(tiny_scene, tmp_path):
    fake, scene = FakeReconstructor(), curation.load_scene(tiny_scene)
    pairs = curate_with(fake, tiny_scene, tmp_path, "underfit", steps=40, underfit_fractions=(0.25, 0.5))
    [run] = fake.runs
    assert (run.views.train, run.views.render, run.views.points_from) == (scene.names, scene.names, None)
    assert run.checkpoint_steps == (10, 20) and run.steps == 20
    assert [step for _, _, step in fake.rendered] == [10, 20]
    assert sorted((pair["step"], pair["view"]) for pair in pairs) == [(s, v) for s in (10, 20) for v in scene.names]


def test_cross_trains_on_the_largest_camera_group_and_renders_the_others(tiny_scene, tmp_path):
    fake, scene = FakeReconstructor(), curation.load_scene(tiny_scene)
    pairs = curate_with(fake, tiny_scene, tmp_path, "cross", steps=40)
    groups = curation.camera_groups(scene, "auto", 2)
    [run] = fake.runs
    assert (run.views.train, run.views.points_from) == (groups[0], groups[0])
    assert run.views.render == sorted(groups[1])
    assert sorted(pair["view"] for pair in pairs) == sorted(groups[1])
    assert all(pair["ref_view"] in groups[0] and pair["variant"] == "groups2" for pair in pairs)


def test_cycle_trains_a_second_model_on_renders_of_shifted_poses(tiny_scene, tmp_path):
    fake, scene = FakeReconstructor(), curation.load_scene(tiny_scene)
    pairs = curate_with(fake, tiny_scene, tmp_path, "cycle", steps=40, cycle_shift=0.5)
    first, second = fake.runs
    shifted = first.views.render
    assert first.views.train == scene.names and len(shifted) == len(scene.names)
    assert set(shifted) == set(first.views.extra_views) and not set(shifted) & set(scene.names)
    spacing = curation.neighbour_spacing(scene.poses[:, :3, 3])
    for number, (name, pose) in enumerate(zip(shifted, scene.poses)):
        moved = first.views.extra_views[name][1][:3, 3] - pose[:3, 3]
        np.testing.assert_allclose(moved, (0.5 if number % 2 == 0 else -0.5) * spacing * pose[:3, 0], atol=1e-9)
    # The second model sees only the first one's renders, at the shifted poses, and renders the originals.
    assert second.views.train == shifted and second.views.render == scene.names
    for name in shifted:
        file, pose = second.views.extra_views[name]
        assert first.folder in file.parents and np.array_equal(pose, first.views.extra_views[name][1])
    assert sorted(pair["view"] for pair in pairs) == scene.names
    for pair in pairs:
        np.testing.assert_allclose(pair["shifted_pose"], first.views.extra_views[curation._shifted_name(pair["view"])][1], atol=1e-6)


def test_manifests_record_the_reconstructor_and_old_ones_count_as_nerfstudio(tiny_scene, tmp_path):
    config = CurateConfig(scene=[tiny_scene], out=tmp_path, strategies=("sparse",), steps=40, reconstructor="nerfstudio")
    parameters = curation.strategy_parameters(config, "sparse")
    assert parameters["reconstructor"] == "nerfstudio"
    del parameters["reconstructor"]  # as written before there was a choice
    manifest = tmp_path / tiny_scene.name / "sparse.json"
    manifest.parent.mkdir()
    manifest.write_text(json.dumps({"parameters": parameters, "pairs": []}))
    assert curation.curate(config, FakeReconstructor()).skipped == [(tiny_scene.name, "sparse")]
    config.reconstructor = "splats"
    with pytest.raises(Difix3DError, match="--overwrite"):
        curation.curate(config, FakeReconstructor())


def test_library_reconstructor_renders_its_checkpoints_and_added_views(tiny_scene, tmp_path):
    from difix3d.data.reconstruction import SplatReconstructor

    scene = curation.load_scene(tiny_scene)
    train, held_out = curation.sparse_split(scene.names, 2)
    extra = {"shifted.png": (scene.image_path(train[0]), curation.shift_sideways(scene.poses[0], 0.2))}
    views = TrainingViews(scene, train, [*held_out[:2], "shifted.png"], points_from=train, extra_views=extra)
    reconstructor = SplatReconstructor(progress=False)
    reconstruction = reconstructor.train(views, tmp_path / "run", steps=6, checkpoint_steps=(2,))
    final = reconstructor.render(reconstruction, views.render)
    early = reconstructor.render(reconstruction, held_out[:1], step=2)
    photo = iio.imread(scene.image_path(held_out[0]))
    assert all(iio.imread(path).shape == photo[..., :3].shape for path in final.values())
    assert not np.array_equal(iio.imread(early[held_out[0]]), iio.imread(final[held_out[0]]))
    with pytest.raises(Difix3DError, match="no checkpoint at step 3"):
        reconstructor.render(reconstruction, held_out[:1], step=3)
    with pytest.raises(Difix3DError, match="not a view of this reconstruction"):
        reconstructor.render(reconstruction, [held_out[3]])


def test_curation_imports_no_nerfstudio():
    code = "import sys, difix3d.data.curation, difix3d.data.reconstruction; print(sorted(m for m in sys.modules if 'nerfstudio' in m))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- errors, resume


def test_cli_errors_are_one_line(capsys, tmp_path):
    assert "scene folder not found" in cli_error(capsys, "--scene", str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    (tmp_path / "empty" / "images").mkdir(parents=True)
    assert "no COLMAP model in sparse/0" in cli_error(capsys, "--scene", str(tmp_path / "empty"), "--out", str(tmp_path / "o"))
    assert "--shard" in cli_error(capsys, "--scene", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--shard", "3/2")


def test_finished_strategies_are_skipped_and_changed_parameters_refused(tiny_scene, tmp_path):
    config = CurateConfig(scene=[tiny_scene], out=tmp_path, strategies=("sparse",), steps=100)
    pair = {"id": "s/sparse/every4/x", "image": "a.png", "target_image": "b.png", "scene": "s", "view": "x.png"}
    manifest = tmp_path / tiny_scene.name / "sparse.json"
    manifest.parent.mkdir()
    parameters = curation.strategy_parameters(config, "sparse")
    manifest.write_text(json.dumps({"parameters": parameters, "pairs": [pair]}))

    result = curation.curate(config)  # would need nerfstudio if it did not skip
    assert result.skipped == [(tiny_scene.name, "sparse")] and result.curated == []
    entry = {key: value for key, value in pair.items() if key != "id"}
    assert json.loads((tmp_path / "dataset.json").read_text()) == {"train": {pair["id"]: entry}, "test": {}}
    config.test_fraction = 0.999  # the split is chosen when the dataset is built
    curation.curate(config)
    assert json.loads((tmp_path / "dataset.json").read_text()) == {"train": {}, "test": {pair["id"]: entry}}

    config.sparse_every = 3
    with pytest.raises(Difix3DError, match="--overwrite"):
        curation.curate(config)
    config.shard = "1/2"  # the only scene belongs to shard 0: nothing to do
    assert curation.curate(config).skipped == []


# ----------------------------------------------------------------------------- shards


def _expected_pair_ids(out: Path, scene_ids) -> list[str]:
    return sorted(
        pair["id"]
        for scene in scene_ids
        for strategy in ("sparse", "underfit")
        for pair in json.loads((out / scene / f"{strategy}.json").read_text())["pairs"]
    )


def _dataset_pair_ids(path: Path) -> list[str]:
    """Every pair ID in the file, duplicates kept (json.loads alone would merge repeated keys)."""
    ids = []

    def collect(items):
        ids.extend(key for key, value in items if isinstance(value, dict) and "target_image" in value)
        return dict(items)

    json.loads(path.read_text(), object_pairs_hook=collect)
    return sorted(ids)


@pytest.fixture
def two_scenes(tiny_scene, tmp_path) -> list[Path]:
    """The tiny scene under two folder names (two scene IDs)."""
    second = tmp_path / "scenes" / "scene_b"
    shutil.copytree(tiny_scene, second)
    return [tiny_scene, second]


@pytest.mark.slow  # two Python processes importing torch: about a minute on a busy 2-core machine
def test_concurrent_shards_build_the_dataset_once_with_every_pair(two_scenes, tmp_path):
    out = tmp_path / "curated"
    (tmp_path / "rendezvous").mkdir()
    common = ["curate", *(f"--scene={scene}" for scene in two_scenes), "--out", str(out), "--strategies", "sparse",
              "underfit", "--steps", "20", "--underfit-fractions", "0.25", "0.75"]  # fmt: skip
    env = {**os.environ, "FAKE_RECONSTRUCTOR_RENDEZVOUS": f"{tmp_path / 'rendezvous'}:2"}
    script = Path(__file__).with_name("fake_reconstructor.py")
    shards = [
        subprocess.Popen([sys.executable, str(script), *common, "--shard", f"{i}/2"], env=env, stdout=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outputs = [shard.communicate(timeout=600)[0] for shard in shards]
    assert [shard.returncode for shard in shards] == [0, 0], outputs
    assert sum("train /" in output for output in outputs) >= 1  # the last to finish built the dataset

    scene_ids = [scene.name for scene in two_scenes]
    expected = _expected_pair_ids(out, scene_ids)
    num_views = len(curation.load_scene(two_scenes[0]).names)
    assert len(expected) == 2 * (num_views - len(range(0, num_views, 4)) + 2 * num_views)
    assert _dataset_pair_ids(out / "dataset.json") == expected
    for index in range(2):
        manifest = json.loads((out / "shards" / f"shard-{index}-of-2.json").read_text())
        assert manifest["finished"] and manifest["scenes"] == [scene_ids[index]]


def test_a_shard_killed_midway_resumes_and_the_last_shard_builds_the_dataset(two_scenes, tmp_path):
    out = tmp_path / "curated"
    config = CurateConfig(scene=two_scenes, out=out, strategies=("sparse", "underfit"), steps=20, shard="1/2")
    result = curation.curate(config, FakeReconstructor())
    assert result.dataset is None and result.waiting_for == ["0/2"] and not (out / "dataset.json").exists()

    class KilledDuringUnderfit(FakeReconstructor):
        def render(self, run, names, step=None):
            if run.folder.name == "underfit":
                raise KeyboardInterrupt  # as if the job were stopped here
            return super().render(run, names, step)

    config.shard = "0/2"
    with pytest.raises(KeyboardInterrupt):
        curation.curate(config, KilledDuringUnderfit())
    assert not json.loads((out / "shards" / "shard-0-of-2.json").read_text())["finished"]
    assert not (out / "dataset.json").exists()

    result = curation.curate(config, FakeReconstructor())
    first = two_scenes[0].name
    assert result.skipped == [(first, "sparse")] and result.curated == [(first, "underfit")]
    assert result.dataset == out / "dataset.json" and result.num_train + result.num_test > 0
    assert _dataset_pair_ids(out / "dataset.json") == _expected_pair_ids(out, [s.name for s in two_scenes])

    config.steps = 30  # another array's shard manifests do not count as finished
    config.strategies = ("sparse",)
    assert curation.unfinished_shards(out, 2, curation._array_settings(config, [s.name for s in two_scenes])) == ["0/2", "1/2"]


def test_scene_ids_must_be_unique_across_all_shards(tiny_scene, tmp_path):
    copy = tmp_path / "other" / tiny_scene.name
    shutil.copytree(tiny_scene, copy)
    config = CurateConfig(scene=[tiny_scene, copy], out=tmp_path / "out", shard="0/2")
    with pytest.raises(Difix3DError, match="unique"):
        curation.curate(config)


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_curate_with_nerfstudio_then_train_and_resume(small_scene, tmp_path):
    """The nerfstudio reconstructor end to end (ns-train and ns-render; several scenes are the fake
    reconstructor's tests above): both of its render paths, a Difix trained on the result, a rerun that finds all done."""
    from difix3d.training.finetune import TrainConfig, load_dataset, train

    out = tmp_path / "curated"
    args = [
        "curate", "--scene", str(small_scene), "--out", str(out),
        "--strategies", "sparse", "underfit", "--steps", "20", "--underfit-fractions", "0.25", "0.75",
        "--test-fraction", "0.2", "--reconstructor", "nerfstudio",
    ]  # fmt: skip
    main(args)

    dataset_path = out / "dataset.json"
    dataset = json.loads(dataset_path.read_text())
    pairs = {**dataset["train"], **dataset["test"]}
    n = len(curation.load_scene(small_scene).names)
    # sparse: the views off every 4th; underfit: every view at steps 5 and 15.
    assert len(pairs) == n - len(range(0, n, 4)) + 2 * n
    assert {(p["scene"], p["strategy"]) for p in pairs.values()} == {(small_scene.name, "sparse"), (small_scene.name, "underfit")}
    assert {p["step"] for p in pairs.values() if p["strategy"] == "underfit"} == {5, 15}
    for pair in pairs.values():
        image, target, ref = (iio.imread(out / pair[key]) for key in ("image", "target_image", "ref_image"))
        assert image.shape == target.shape == ref.shape
        assert pair["ref_view"] != pair["view"]
        assert np.abs(image[..., :3].astype(float) - target[..., :3]).mean() > 1  # a degraded render
        assert np.array(pair["pose"]).shape == np.array(pair["ref_pose"]).shape == (4, 4)
    view = Path(curation.load_scene(small_scene).names[0]).stem
    early, late = (iio.imread(out / small_scene.name / "underfit" / f"step{s:06d}" / f"{view}.png") for s in (5, 15))
    assert not np.array_equal(early, late)  # each step's own checkpoint rendered
    assert not (out / small_scene.name / "work").exists()  # work folders are removed when done

    splits = load_dataset(dataset_path)
    assert len(splits["train"]) == len(dataset["train"]) > 0
    result = train(
        TrainConfig(
            dataset=dataset_path, output=tmp_path / "difix", model="random-tiny-architecture", perceptual_backbone="random",
            steps=2, crop_size=64, eval_every=0, checkpoint_every=2,
        )
    )  # fmt: skip
    assert result.final_step == 2

    # Run again: everything is found done and skipped (no reconstruction starts).
    result = curation.curate(CurateConfig(
        scene=[small_scene], out=out, strategies=("sparse", "underfit"), steps=20,
        underfit_fractions=(0.25, 0.75), test_fraction=0.2, reconstructor="nerfstudio",
    ))  # fmt: skip
    assert result.curated == [] and len(result.skipped) == 2
    assert json.loads(dataset_path.read_text()) == dataset


def degraded_pairs(out: Path, pairs: list[dict]) -> None:
    """Every render differs from its photograph, but looks like the scene (not noise, not empty)."""
    for pair in pairs:
        image, target = (iio.imread(out / pair[key])[..., :3].astype(float) for key in ("image", "target_image"))
        error = np.abs(image - target).mean()
        assert 1 < error < 60, (pair["id"], error)


@pytest.mark.slow
def test_cross_end_to_end_with_the_library_reconstructor(small_scene, tmp_path):
    out = tmp_path / "curated"
    main(["curate", "--scene", str(small_scene), "--out", str(out), "--strategies", "cross", "--steps", "150", "--device", "cpu"])
    pairs = json.loads((out / small_scene.name / "cross.json").read_text())["pairs"]
    groups = curation.camera_groups(curation.load_scene(small_scene), "auto", 2)
    assert sorted(pair["view"] for pair in pairs) == sorted(groups[1])
    degraded_pairs(out, pairs)
    dataset = json.loads((out / "dataset.json").read_text())
    assert len(dataset["train"]) + len(dataset["test"]) == len(pairs)


@pytest.mark.slow
def test_cycle_end_to_end_with_the_library_reconstructor(small_scene, tmp_path):
    out = tmp_path / "curated"
    main(["curate", "--scene", str(small_scene), "--out", str(out), "--strategies", "cycle", "--steps", "150",
          "--device", "cpu", "--keep-work"])  # fmt: skip
    pairs = json.loads((out / small_scene.name / "cycle.json").read_text())["pairs"]
    scene = curation.load_scene(small_scene)
    assert sorted(pair["view"] for pair in pairs) == scene.names
    degraded_pairs(out, pairs)
    # The second model learnt from the first one's renders of the shifted poses, which exist.
    shifted = sorted((out / small_scene.name / "work" / "cycle" / "cycle_first" / "renders" / "latest").glob("*.png"))
    assert len(shifted) == len(scene.names)
