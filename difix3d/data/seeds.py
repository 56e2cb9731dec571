"""Scene seeds reserved for the quality benchmark's evaluation scenes (`scripts/bench_quality.py`).

A procedural scene is a function of its seed (`difix3d.data.scenes.build_scene`). Data that trains a
Difix must never come from these seeds: a Difix that has seen an evaluation scene would be scored
on its own training data. Check with `is_evaluation_seed` when choosing training scenes.
"""

from __future__ import annotations

EVALUATION_SEED_RANGE = range(1000, 2000)
"""Seeds that only the benchmark's evaluation scenes may use."""

EVALUATION_SEEDS = tuple(range(1000, 1019))
"""The benchmark's evaluation scenes (M = 19)."""


def is_evaluation_seed(seed: int) -> bool:
    """Whether `seed` is reserved for evaluation scenes."""
    return seed in EVALUATION_SEED_RANGE
