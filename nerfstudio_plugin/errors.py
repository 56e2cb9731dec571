"""This project's errors inside nerfstudio's commands (ns-train, ns-render, ns-eval) as one line.

nerfstudio lets exceptions reach the interpreter, which prints the whole traceback: for a
`Difix3DError` (a bad flag, a missing model, a damaged scene) that hides the one line that says what
to do. The hook prints that line and leaves every other exception to the previous hook.
"""

from __future__ import annotations

import sys
from pathlib import Path

from difix3d.errors import Difix3DError


def show_difix3d_errors_as_one_line() -> None:
    previous = sys.excepthook
    if getattr(previous, "shows_difix3d_errors", False):
        return

    def hook(kind, value, traceback) -> None:
        if isinstance(value, Difix3DError):
            program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "difix3d-gs"
            print(f"{program}: error: {value}", file=sys.stderr)
        else:
            previous(kind, value, traceback)

    hook.shows_difix3d_errors = True  # type: ignore[attr-defined]
    sys.excepthook = hook
