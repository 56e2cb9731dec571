"""Where Difix models come from, importable without loading diffusers (the CLI's defaults use it)."""

from __future__ import annotations

from pathlib import Path

DEFAULT_BASE = "stabilityai/sd-turbo"
"""The SD-Turbo that a reference-release `.pkl` is applied on."""

# The Difix that ships inside the package: the `small` architecture trained on procedural scenes on the
# CPU by scripts/train_embedded_difix.py (see its README.md). The default where no model is named; it
# knows nothing but those scenes: name `nvidia/difix_ref` for photographs.
EMBEDDED_DIFIX = str(Path(__file__).resolve().parents[1] / "assets" / "difix-small-procedural")
EMBEDDED_NAME = "embedded"
"""The name that stands for `EMBEDDED_DIFIX` wherever a model is named (`--model embedded`)."""

PROMPT = "remove degradation"
"""Difix's fixed text prompt (the release's)."""

# Random weights are only ever built from these explicit names ("random-tiny-architecture",
# "random-sd-turbo-architecture"): a bare architecture name ("sd-turbo") must never give noise.
RANDOM_PREFIX, RANDOM_SUFFIX = "random-", "-architecture"


def random_weights_architecture(spec: str) -> str | None:
    """The architecture name in a random-weights model name, or None for any other model spec."""
    spec = str(spec)
    if spec.startswith(RANDOM_PREFIX) and spec.endswith(RANDOM_SUFFIX):
        return spec[len(RANDOM_PREFIX) : -len(RANDOM_SUFFIX)]
    return None


def random_weights_name(architecture: str) -> str:
    """The model name that builds `architecture` with random weights (tests and timing only)."""
    return f"{RANDOM_PREFIX}{architecture}{RANDOM_SUFFIX}"
