"""Issue 14's failures of the `difix3d-gs` method, each reproduced: through nerfstudio's own commands
where that is where they happened, in-process where a unit shows the cause faster."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BIN = Path(sys.executable).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
CPU = ("--machine.device-type", "cpu", "--vis", "tensorboard")
QUICK = ("--steps-per-eval-image", "10000", "--steps-per-eval-all-images", "10000")
# Densify early and often, so that a short run changes its number of Gaussians.
DENSIFY = ("--pipeline.model.warmup-length", "10", "--pipeline.model.refine-every", "10")


def command(*parts, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([str(part) for part in parts], env=ENV, capture_output=True, text=True, timeout=timeout)


def succeeded(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def one_line_error(result: subprocess.CompletedProcess, program: str) -> str:
    """The failure's last stderr line, which must be this project's one-line error, with no traceback."""
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{program}: error: "), result.stderr[-3000:]
    return last


def ns_train(scene: Path, output: Path, steps: int, *extra) -> Path:
    """Plain 3DGS (Difix off: these failures are in the 3DGS side) for `steps` steps; the run directory."""
    succeeded(command(
        BIN / "ns-train", "difix3d-gs", "--data", scene, "--output-dir", output, "--experiment-name", "test",
        "--timestamp", "run", *CPU, *QUICK, "--max-num-iterations", steps, "--pipeline.difix.enabled", "False", *extra,
    ))
    return output / "test" / "difix3d-gs" / "run"


def copy_scene(scene: Path, destination: Path, rename=lambda name: name) -> Path:
    """A copy of a COLMAP scene with its images renamed (in the model too)."""
    import pycolmap

    (destination / "images").mkdir(parents=True)
    reconstruction = pycolmap.Reconstruction(str(scene / "sparse" / "0"))
    for image in reconstruction.images.values():
        shutil.copy(scene / "images" / image.name, destination / "images" / rename(image.name))
        image.name = rename(image.name)
    (destination / "sparse" / "0").mkdir(parents=True)
    reconstruction.write_binary(str(destination / "sparse" / "0"))
    return destination


def gaussian_count(checkpoint: Path) -> int:
    import nerfstudio_plugin  # noqa: F401  (nerfstudio checkpoints load with weights_only)

    return torch.load(checkpoint, map_location="cpu")["pipeline"]["_model.gauss_params.means"].shape[0]


# ---------------------------------------- cases 4 and 5: resume past densification, a killed save


def test_load_keeps_the_optimizers_on_the_model_parameters():
    """The cause of case 4: Splatfacto's load swapped in new parameters, the optimizers kept the old ones."""
    from gsplat.strategy.ops import duplicate
    from nerfstudio.data.scene_box import SceneBox

    from nerfstudio_plugin.model import Difix3DGSModelConfig

    box = SceneBox(aabb=torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]]))
    model = Difix3DGSModelConfig(num_random=50).setup(scene_box=box, num_train_data=2, metadata={})
    optimizers = {name: torch.optim.Adam(params, lr=1e-3) for name, params in model.get_gaussian_param_groups().items()}
    densified = {
        key: torch.cat([value, value[:7]]) if key.startswith("gauss_params.") else value
        for key, value in model.state_dict().items()
    }
    model.load_state_dict(densified)
    assert model.means.shape[0] == 57
    for name, optimizer in optimizers.items():
        assert optimizer.param_groups[0]["params"][0] is model.gauss_params[name], name
    # gsplat's densification on the loaded model: it indexed the construction-sized tensors before.
    state = {"grad2d": torch.zeros(57), "count": torch.zeros(57)}
    duplicate(model.gauss_params, optimizers, state, mask=torch.arange(57) >= 50)
    assert model.means.shape[0] == 64


@pytest.fixture(scope="module")
def densified_run(tiny_scene, tmp_path_factory) -> Path:
    """35 steps with a refinement at step 30 (Splatfacto pauses refinement for its first 22 steps
    here): the checkpoint at step 34 holds another number of Gaussians than SfM's seed points."""
    import pycolmap

    run = ns_train(tiny_scene, tmp_path_factory.mktemp("densified"), 35, *DENSIFY)
    seed_points = pycolmap.Reconstruction(str(tiny_scene / "sparse" / "0")).num_points3D()
    assert gaussian_count(run / "nerfstudio_models" / "step-000000034.ckpt") != seed_points
    return run


@pytest.mark.slow
def test_resume_past_densification_and_a_broken_newest_checkpoint(densified_run, tiny_scene, tmp_path):
    """Case 4: `--load-dir` of a run that densified died at the next refinement with an IndexError.
    Case 5 in the same resume: a run killed while saving left a 0-byte newest checkpoint, and
    `--load-dir` died with EOFError."""
    checkpoints = tmp_path / "nerfstudio_models"
    shutil.copytree(densified_run / "nerfstudio_models", checkpoints)
    (checkpoints / "step-000000040.ckpt").write_bytes(b"")  # what the kill left
    loaded = gaussian_count(checkpoints / "step-000000034.ckpt")
    # Steps 35..54, refinements at 40 and 50 on the loaded Gaussians: the last checkpoint's step
    # says the run resumed from step 34, not from the broken 40 (nor from scratch).
    resumed = ns_train(tiny_scene, tmp_path / "resumed", 20, *DENSIFY, "--load-dir", checkpoints)
    final = gaussian_count(resumed / "nerfstudio_models" / "step-000000054.ckpt")
    assert final != loaded
    checkpoint = checkpoints / "step-000000034.ckpt"
    started = ns_train(tiny_scene, tmp_path / "from_checkpoint", 10, *DENSIFY, "--load-checkpoint", checkpoint)
    assert (started / "nerfstudio_models" / "step-000000044.ckpt").is_file()


def test_checkpoint_writes_are_atomic(tmp_path):
    """Case 5's cause: checkpoints were written in place. An interrupted save leaves the old one whole."""
    from types import SimpleNamespace

    from nerfstudio_plugin.trainer import Difix3DTrainer, latest_complete_step

    class Unpicklable:
        def __reduce__(self):
            raise KeyboardInterrupt  # the process is stopped halfway through writing

    trainer = SimpleNamespace(
        checkpoint_dir=tmp_path / "run" / "nerfstudio_models",
        config=SimpleNamespace(save_only_latest_checkpoint=True),
        pipeline=SimpleNamespace(state_dict=lambda: {"weights": torch.zeros(1000)}),
        optimizers=SimpleNamespace(optimizers={}, schedulers={}),
        grad_scaler=SimpleNamespace(state_dict=lambda: {}),
    )
    Difix3DTrainer.save_checkpoint(trainer, 10)
    trainer.pipeline = SimpleNamespace(state_dict=lambda: {"weights": torch.ones(1000), "tail": Unpicklable()})
    with pytest.raises(KeyboardInterrupt):
        Difix3DTrainer.save_checkpoint(trainer, 20)
    assert sorted(p.name for p in (tmp_path / "run").rglob("*")) == ["nerfstudio_models", "step-000000010.ckpt"]
    assert latest_complete_step(trainer.checkpoint_dir) == 10


# ----------------------------------------------------------------------- case 6: ns-eval, ns-render


@pytest.mark.slow
def test_eval_without_held_out_views_and_render_without_difix(tiny_scene, tmp_path):
    """Case 6: ns-eval of a scene without eval images raised IndexError; ns-render rgb_enhanced of a
    run without Difix failed in nerfstudio after writing part of the render."""
    scene = copy_scene(tiny_scene, tmp_path / "scene", lambda name: name.replace("frame_eval", "frame_train_extra"))
    run = ns_train(scene, tmp_path / "outputs", 2)
    error = one_line_error(command(BIN / "ns-eval", "--load-config", run / "config.yml", "--output-path", tmp_path / "m.json"), "ns-eval")
    assert "no held-out (eval) images" in error
    renders = tmp_path / "renders"
    error = one_line_error(command(
        BIN / "ns-render", "dataset", "--load-config", run / "config.yml", "--split", "train",
        "--rendered-output-names", "rgb", "rgb_enhanced", "--output-path", renders,
    ), "ns-render")
    assert "--pipeline.difix.enabled False" in error and "rgb_enhanced" in error
    assert not renders.exists()


# ----------------------------------------------------------------------- cases 9 and 10: one-line errors


@pytest.mark.slow  # no training, but starting ns-train took 80 s on the shared 2-core machine
def test_project_errors_in_ns_train_are_one_line(tiny_scene, tmp_path):
    """Case 9: this project's errors inside ns-train arrived as 25-line tracebacks naming difix3d fix's
    flag. One error through ns-train shows the path to its one line; the checks behind the others are
    called in-process below."""
    flags = ("--pipeline.progressive.num-refs", "99")
    result = command(BIN / "ns-train", "difix3d-gs", "--data", tiny_scene, "--output-dir", tmp_path, *CPU, *flags)
    error = one_line_error(result, "ns-train")
    assert "--pipeline.progressive.num-refs 99 is more than the 12 training images" in error


def test_progressive_settings_are_checked_under_the_plugins_flag_names():
    """The check behind case 9's other progressive flags."""
    from difix3d.core.progressive import ProgressiveConfig
    from difix3d.errors import Difix3DError

    with pytest.raises(Difix3DError, match="--pipeline.progressive.steps-per-fix must be >= 1, got 0"):
        ProgressiveConfig(steps_per_fix=0).validate(flag_prefix="--pipeline.progressive.")


@pytest.mark.parametrize(
    ("model", "expected"),
    [("nvidia/difix_ref", "--pipeline.difix.model DIFIX3D_EMBEDDED"), ("sd-turbo", "random-sd-turbo-architecture")],
    ids=["offline default model", "architecture name"],
)
def test_difix_model_errors_name_the_plugins_flag(model, expected):
    """Case 9's Difix errors, from the pipeline's loading step (what ns-train calls before step 0)."""
    from types import SimpleNamespace

    from difix3d.errors import Difix3DError
    from difix3d.models.ids import EMBEDDED_DIFIX
    from nerfstudio_plugin.pipeline import Difix3DPipeline, DifixSettings

    pipeline = SimpleNamespace(config=SimpleNamespace(difix=DifixSettings(model=model)), device="cpu", test_mode="val")
    with pytest.raises(Difix3DError) as raised:
        Difix3DPipeline._load_fixer(pipeline)
    message = str(raised.value)
    assert message.startswith(f"--pipeline.difix.model {model}: ") and "\n" not in message
    assert expected.replace("DIFIX3D_EMBEDDED", EMBEDDED_DIFIX) in message
    assert "--model DIR" not in message


def test_truncated_colmap_model_is_named(tiny_scene, tmp_path):
    """Case 10: a truncated sparse/0/cameras.bin gave `struct.error: unpack requires a buffer of 24 bytes`."""
    from difix3d.errors import Difix3DError
    from nerfstudio_plugin.dataparser import Difix3DColmapDataParserConfig

    scene = copy_scene(tiny_scene, tmp_path / "scene")
    cameras = scene / "sparse" / "0" / "cameras.bin"
    cameras.write_bytes(cameras.read_bytes()[:30])
    with pytest.raises(struct.error):  # what nerfstudio's own reader raises
        from nerfstudio.data.utils.colmap_parsing_utils import read_cameras_binary

        read_cameras_binary(cameras)
    parser = Difix3DColmapDataParserConfig(data=scene, colmap_path=Path("sparse/0")).setup()
    with pytest.raises(Difix3DError, match=f"{cameras} is truncated or corrupt"):
        parser.get_dataparser_outputs("train")


@pytest.mark.slow  # starts ns-train
def test_truncated_colmap_model_is_one_line_in_ns_train(tiny_scene, tmp_path):
    scene = copy_scene(tiny_scene, tmp_path / "scene")
    cameras = scene / "sparse" / "0" / "cameras.bin"
    cameras.write_bytes(cameras.read_bytes()[:30])
    result = command(BIN / "ns-train", "difix3d-gs", "--data", scene, "--output-dir", tmp_path / "out", *CPU)
    assert f"{cameras} is truncated or corrupt" in one_line_error(result, "ns-train")


# ----------------------------------------------------------------------- cases 11 and 12: a new user's scene


def test_split_follows_the_image_names(tiny_scene, tmp_path, capsys):
    """Case 12: a COLMAP scene whose names carry no train/eval failed with nerfstudio's
    "frame should contain train/eval in its name"."""
    from nerfstudio_plugin.dataparser import Difix3DColmapDataParserConfig

    own = copy_scene(tiny_scene, tmp_path / "own", lambda name: "IMG_" + name[-8:-4] + name[6:10] + ".png")
    outputs = {
        split: Difix3DColmapDataParserConfig(data=own, colmap_path=Path("sparse/0")).setup().get_dataparser_outputs(split)
        for split in ("train", "test")
    }
    assert len(outputs["train"].image_filenames) + len(outputs["test"].image_filenames) == 20
    assert len(outputs["test"].image_filenames) == 3  # nerfstudio's interval split: every 8th image
    assert "interval split" in capsys.readouterr().out
    ours = Difix3DColmapDataParserConfig(data=tiny_scene, colmap_path=Path("sparse/0")).setup()
    assert all("eval" in path.name for path in ours.get_dataparser_outputs("test").image_filenames)
    assert "by file name" in capsys.readouterr().out


@pytest.mark.slow
def test_readme_ns_train_exits_on_a_headless_machine(tiny_scene, tmp_path):
    """Case 11: with the viewer (nerfstudio's default --vis) ns-train never exited after training;
    and case 12 through ns-train: a user's scene whose image names carry no train/eval."""
    own = copy_scene(tiny_scene, tmp_path / "own", lambda name: "IMG_" + name[-8:-4] + name[6:10] + ".png")
    result = command(
        BIN / "ns-train", "difix3d-gs", "--data", own, "--output-dir", tmp_path / "outputs", "--machine.device-type", "cpu",
        "--max-num-iterations", "2", "--pipeline.difix.enabled", "False", *QUICK, timeout=600,
    )
    assert "interval split" in succeeded(result)
