"""Where Difix models come from, importable without loading diffusers (the CLI's defaults use it)."""

from __future__ import annotations

from pathlib import Path

DEFAULT_BASE = "stabilityai/sd-turbo"
"""The SD-Turbo that a reference-release `.pkl` is applied on."""

# The Difix that ships inside the package: the `tiny` architecture trained on procedural scenes on the
# CPU by scripts/bench_quality.py (see its README.md). The default where no model is named; it knows
# nothing but those scenes: name `nvidia/difix_ref` for photographs.
EMBEDDED_DIFIX = str(Path(__file__).resolve().parent / "assets" / "difix-tiny-procedural")

PROMPT = "remove degradation"
"""Difix's fixed text prompt (the release's)."""
