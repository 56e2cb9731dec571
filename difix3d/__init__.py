"""difix3d: Difix3D+ (CVPR 2025) for nerfstudio and gsplat users.

The library is framework-free: nothing here imports nerfstudio (that lives in `nerfstudio_plugin`).
"""

# Pillow before pycolmap (which difix3d.data imports): the pycolmap wheel's zlib, when it is loaded
# first, makes Pillow's PNG writer abort the process ("double free or corruption").
import PIL.Image  # noqa: F401, I001

from difix3d.errors import Difix3DError

__version__ = "0.1.0"
__all__ = ["Difix3DError", "__version__"]
