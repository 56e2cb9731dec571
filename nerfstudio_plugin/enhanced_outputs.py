"""`rgb_enhanced` computed only when someone asks for it.

Difix costs several times a splat render, so the models offer `rgb_enhanced` without computing it:
`get_outputs_for_camera` returns `EnhancedOutputs`, a dict that lists `rgb_enhanced` among its keys
and runs the enhancer the first time that key is read. ns-render and ns-eval read it by name
(`--rendered-output-names rgb_enhanced`, the `_enhanced` metrics); an `rgb` frame never does.

The viewer reads the displayed output after its render, outside its interrupt hook and training
lock. So a frame rendered by the viewer's render thread is enhanced up front (interruptible, under
the lock) when `rgb_enhanced` is shown, in the main or the split view; the low-resolution frames sent
while the camera moves show the plain render, and the settled frame is enhanced.
"""

from __future__ import annotations

import threading
from typing import Callable, Dict

import torch
from nerfstudio.viewer.render_state_machine import RenderStateMachine

ENHANCED = "rgb_enhanced"


class EnhancedOutputs(dict):
    """A model's outputs whose lazy entries are computed (once) when first read."""

    def __init__(self, outputs: Dict[str, torch.Tensor], lazy: Dict[str, Callable[[], torch.Tensor]]) -> None:
        super().__init__(outputs)
        self._lazy = dict(lazy)

    def __missing__(self, name: str) -> torch.Tensor:
        if name not in self._lazy:
            raise KeyError(name)
        with torch.no_grad():
            value = self[name] = self._lazy.pop(name)()
        return value

    def __contains__(self, name: object) -> bool:
        return super().__contains__(name) or name in self._lazy

    def __iter__(self):
        return iter(self.keys())

    def __len__(self) -> int:
        return super().__len__() + len(self._lazy)

    def keys(self):  # type: ignore[override]
        return list(super().keys()) + list(self._lazy)

    def get(self, name, default=None):  # type: ignore[override]
        return self[name] if name in self else default

    def items(self):  # type: ignore[override]
        return [(name, self[name]) for name in self.keys()]

    def values(self):  # type: ignore[override]
        return [self[name] for name in self.keys()]


def viewer_wants_enhanced() -> bool:
    """True when called by the viewer's render thread for a frame that shows `rgb_enhanced`
    (main or split view) and is no low-resolution frame of a moving camera."""
    renderer = threading.current_thread()
    if not isinstance(renderer, RenderStateMachine) or renderer.state == "low_move":
        return False
    panel = renderer.viewer.control_panel
    return panel.output_render == ENHANCED or (panel.split and panel.split_output_render == ENHANCED)


def in_viewer() -> bool:
    return isinstance(threading.current_thread(), RenderStateMachine)


def with_enhanced(outputs: Dict[str, torch.Tensor], enhance: Callable[[], torch.Tensor]) -> EnhancedOutputs:
    """`outputs` plus `rgb_enhanced` = `enhance()`, computed when read; in the viewer, computed now
    when it is displayed, and the plain render while the camera moves."""
    result = EnhancedOutputs(outputs, {ENHANCED: enhance})
    if in_viewer():
        if viewer_wants_enhanced():
            result[ENHANCED]  # noqa: B018 - computed here, inside the viewer's lock and interrupt hook
        else:
            result[ENHANCED] = outputs["rgb"]
            result._lazy.clear()
    return result
