"""difix3d: Difix3D+ (CVPR 2025) for nerfstudio and gsplat users.

The library is framework-free: nothing here imports nerfstudio (that lives in `nerfstudio_plugin`).
"""

from difix3d.errors import Difix3DError

__version__ = "0.1.0"
__all__ = ["Difix3DError", "__version__"]
