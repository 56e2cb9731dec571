"""Where `ProgressiveConfig` lived before the library had subpackages (now `difix3d.core.progressive`).

Runs saved then name `difix3d.progressive.ProgressiveConfig` in their config.yml (nerfstudio's saved
configuration); this keeps them loading. New code imports from `difix3d.core.progressive`.
"""

from difix3d.core.progressive import ProgressiveConfig

__all__ = ["ProgressiveConfig"]
