"""`rgb_enhanced` runs the enhancer only when read: ns-render/ns-eval by name, the viewer while shown."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("nerfstudio")

from nerfstudio.cameras.cameras import Cameras  # noqa: E402
from nerfstudio.data.scene_box import SceneBox  # noqa: E402
from nerfstudio.viewer.render_state_machine import RenderStateMachine  # noqa: E402

from nerfstudio_plugin.enhanced_outputs import EnhancedOutputs  # noqa: E402
from nerfstudio_plugin.model import Difix3DGSModelConfig  # noqa: E402


class CountingEnhancer:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, rgb: torch.Tensor, pose: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return 1 - rgb


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    seed_points = (torch.randn(64, 3) * 0.3, torch.randint(0, 255, (64, 3), dtype=torch.uint8))
    model = Difix3DGSModelConfig().setup(scene_box=SceneBox(torch.tensor([[-1.0] * 3, [1.0] * 3])), num_train_data=2, seed_points=seed_points)
    return model.eval()


def camera() -> Cameras:
    pose = torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 3]])
    return Cameras(camera_to_worlds=pose[None], fx=40.0, fy=40.0, cx=16.0, cy=12.0, width=32, height=24)


class FakeViewerRenderer(RenderStateMachine):
    """The viewer's render thread, as far as the model can tell: its state and its control panel."""

    def __init__(self, model, state: str, shown: str, split_shown: str | None = None) -> None:
        threading.Thread.__init__(self)
        self.model, self.state = model, state
        panel = SimpleNamespace(output_render=shown, split=split_shown is not None, split_output_render=split_shown)
        self.viewer = SimpleNamespace(control_panel=panel)

    def run(self) -> None:  # render, then read the displayed output as `_send_output_to_viewer` does
        outputs = self.model.get_outputs_for_camera(camera())
        self.keys = list(outputs.keys())
        self.shown = outputs[self.viewer.control_panel.output_render]
        self.rgb = outputs["rgb"]


def test_rgb_enhanced_is_offered_but_computed_only_when_read(model):
    enhancer = CountingEnhancer()
    model.set_enhancer(enhancer)
    outputs = model.get_outputs_for_camera(camera())
    assert isinstance(outputs, EnhancedOutputs) and "rgb_enhanced" in outputs and "rgb_enhanced" in outputs.keys()
    outputs["rgb"], outputs["depth"], outputs.get("accumulation")
    assert enhancer.calls == 0
    assert torch.equal(outputs["rgb_enhanced"], 1 - outputs["rgb"])  # what ns-render / ns-eval do
    outputs["rgb_enhanced"], dict(outputs.items())
    assert enhancer.calls == 1


@pytest.mark.parametrize(
    "state, shown, split, calls",
    [
        ("high", "rgb", None, 0),
        ("low_static", "depth", None, 0),
        ("high", "rgb_enhanced", None, 1),
        ("low_static", "rgb_enhanced", None, 1),
        ("low_move", "rgb_enhanced", None, 0),  # a moving camera's preview: the plain render
        ("high", "rgb", "rgb_enhanced", 1),
    ],
)
def test_viewer_enhances_only_frames_that_show_rgb_enhanced(model, state, shown, split, calls):
    enhancer = CountingEnhancer()
    model.set_enhancer(enhancer)
    renderer = FakeViewerRenderer(model, state, shown, split)
    renderer.start()
    renderer.join()
    assert "rgb_enhanced" in renderer.keys and enhancer.calls == calls
    if shown == "rgb_enhanced":
        assert torch.equal(renderer.shown, 1 - renderer.rgb if calls else renderer.rgb)
