"""Data for Difix: procedural scenes, structure from motion, and training pairs.

- `scenes`: procedural rooms with known geometry, ray-traced at any pose;
- `textures`: what their surfaces show (the `shapes` and `materials` contents);
- `sfm`: COLMAP structure from motion with pycolmap;
- `seeds`: the scene seeds reserved for the quality benchmark;
- `curation`: `difix3d curate`, training pairs from COLMAP scenes;
- `ground_truth_pairs`: the ground-truth data engine, pairs from procedural scenes at any pose;
- `reconstruction`: the reconstructors curation asks for 3D reconstructions.
"""
