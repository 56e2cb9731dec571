"""Take nine seconds off every nerfstudio 1.1.5 command start.

While ns-train builds its method table, nerfstudio creates one placeholder config per not-installed
external method (26 of them), and each placeholder's `__post_init__` asks `inspect.stack()[2]` who
created it. `inspect.stack()` resolves the source file and module of every frame on the stack by
scanning `sys.modules`, which with torch, diffusers and nerfstudio loaded takes about 0.35 s a call
on 2 cores: 9 s of CPU per `ns-train`, before training starts. The same question is answered by the
calling frame's code name, which costs nothing; every other path (a user picking an external method
on the command line) runs nerfstudio's own code unchanged.
"""

from __future__ import annotations

import sys


def skip_the_slow_external_method_check() -> None:
    try:
        from nerfstudio.configs.external_methods import ExternalMethodDummyTrainerConfig
    except ImportError:  # a nerfstudio without external-method placeholders: nothing to speed up
        return
    original = ExternalMethodDummyTrainerConfig.__post_init__
    if getattr(original, "skips_the_stack_walk", False):
        return

    def post_init(self) -> None:
        # Frames: 0 this function, 1 the dataclass __init__, 2 whoever built the placeholder.
        if sys._getframe(2).f_code.co_name == "get_external_methods":
            return
        original(self)

    post_init.skips_the_stack_walk = True  # type: ignore[attr-defined]
    ExternalMethodDummyTrainerConfig.__post_init__ = post_init
