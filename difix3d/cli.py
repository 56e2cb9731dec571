"""The `difix3d` command: one tyro CLI, one subcommand per job.

Each subcommand is a function in the module that owns the job; tyro builds the flags from its
signature and docstring. User errors (`Difix3DError`) end as one line on stderr, exit status 2.
"""

from __future__ import annotations

import sys

import tyro

from difix3d.errors import Difix3DError
from difix3d.runtime import configure_cpu_runtime


def _commands() -> dict:
    # Imported here so `difix3d --help` pays only for the modules it describes.
    from difix3d import fix, imagenet_weights
    from difix3d.data import curation, scenes
    from difix3d.training import finetune

    return {
        "scene": scenes.scene_command,
        "fix": fix.fix_command,
        "train": finetune.train_command,
        "curate": curation.curate_command,
        "weights": imagenet_weights.weights_command,
    }


def main(args: list[str] | None = None) -> None:
    # Ray-tracing a scene is many small operations, where threads mostly wait on busy cores; the
    # other commands (Difix's convolutions) keep PyTorch's default thread count.
    command = (sys.argv[1:] if args is None else args)[:1]
    configure_cpu_runtime(1 if command == ["scene"] else None)
    try:
        tyro.extras.subcommand_cli_from_dict(_commands(), args=args, description=__doc__.splitlines()[0])
    except Difix3DError as error:
        print(f"difix3d: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("difix3d: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
