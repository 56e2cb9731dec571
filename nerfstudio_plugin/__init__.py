"""The nerfstudio method `difix3d-gs`: the only package in this project that imports nerfstudio.

Importing it (ns-train discovers it through the `nerfstudio.method_configs` entry point; ns-render and
ns-eval import it while reading a run's config.yml) makes nerfstudio's checkpoints loadable under
torch's `weights_only` default, and shows this project's errors in those commands as one line.
"""

# nerfstudio's method table first: importing it discovers the plugins, which imports
# `nerfstudio_plugin.config`, whose methods copy that table's optimizers. Imported from here, the
# table is complete by then whichever module was imported first (`import nerfstudio_plugin.config`
# started from config.py itself would meet it half-imported).
import nerfstudio.configs.method_configs  # noqa: F401  (isort: skip)

from nerfstudio_plugin.checkpoints import allow_nerfstudio_checkpoint_globals
from nerfstudio_plugin.errors import show_difix3d_errors_as_one_line

allow_nerfstudio_checkpoint_globals()
show_difix3d_errors_as_one_line()
