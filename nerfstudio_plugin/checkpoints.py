"""Let nerfstudio 1.1.5's bare `torch.load` read its own checkpoints under torch >= 2.6.

Since torch 2.6 `torch.load` defaults to `weights_only=True`. nerfstudio's learning-rate schedulers
compute rates with numpy, so its checkpoints hold numpy float64 scalars in the optimizer and
scheduler states, which the restricted unpickler refuses ("Unsupported global:
numpy.core.multiarray.scalar") in ns-render, ns-eval, the viewer and --load-dir. We allow exactly the
globals such a scalar needs; `weights_only` itself stays on.
"""

from __future__ import annotations

import numpy as np
import torch


def numpy_scalar_globals() -> list:
    """The globals pickle needs to rebuild a numpy float64 scalar, for numpy 1.x and 2.x."""
    if np.lib.NumpyVersion(np.__version__) >= "2.0.0":
        from numpy._core import multiarray
    else:
        from numpy.core import multiarray
    return [multiarray.scalar, np.dtype, type(np.dtype(np.float64))]


def allow_nerfstudio_checkpoint_globals() -> None:
    torch.serialization.add_safe_globals(numpy_scalar_globals())
