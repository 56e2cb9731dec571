"""The Difix3D core, free of any 3D framework: what every host (the nerfstudio methods, the plain
gsplat trainer, your own loop) drives.

- `steps`: the fix rounds and the Difix3D+ enhancer as steps a host calls, with their state;
- `progressive`: the round bookkeeping (targets, pseudo poses, the manifest);
- `poses`: pose maths (distances, nearest references, shifting toward targets, trajectories);
- `fixer`: the one thing the steps ask of an image fixer, and Difix's answer.
"""

# Runs saved before the library had subpackages name `difix3d.core.EnhancerConfig` in their
# config.yml (nerfstudio's saved configuration): it must still resolve here.
from difix3d.core.steps import EnhancerConfig

__all__ = ["EnhancerConfig"]
