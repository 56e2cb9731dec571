"""The nerfstudio method `difix3d-gs`: the only package in this project that imports nerfstudio.

Importing it (ns-train discovers it through the `nerfstudio.method_configs` entry point; ns-render and
ns-eval import it while reading a run's config.yml) makes nerfstudio's checkpoints loadable under
torch's `weights_only` default, shows this project's errors in those commands as one line, and spares
every ns-train start nerfstudio's 9-second stack walk (`startup`).
"""

from nerfstudio_plugin.checkpoints import allow_nerfstudio_checkpoint_globals
from nerfstudio_plugin.errors import show_difix3d_errors_as_one_line
from nerfstudio_plugin.startup import skip_the_slow_external_method_check

allow_nerfstudio_checkpoint_globals()
show_difix3d_errors_as_one_line()
skip_the_slow_external_method_check()
