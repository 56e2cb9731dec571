"""Download the wheels that `scripts/gpu_check.sh` needs on the lent GPU machine and its image lacks.

That machine cannot download anything: its image (Python 3.12, x86-64, CUDA torch; package names
in `scripts/gpu_image_packages.txt`) lacks some of what the check imports, so those travel with
the working tree as wheels (at most 64 MiB per call). Starting from the packages the check imports
that the image lacks (ROOTS), this follows each wheel's own requirements (markers evaluated for
that machine, extras left out) and downloads every package not in the image, at the version
installed in the Python that runs this script (the versions `make test` ran with). The folder ends
up holding exactly that set; the total must stay under --max-mib.

    python scripts/gpu_wheels.py --dest .gpu-wheels          # `make gpu-wheels`
"""

from __future__ import annotations

import argparse
import email.parser
import importlib.metadata
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# What the GPU check imports that the image does not have: diffusers (the Difix network),
# gsplat (CUDA rasterizer; a source package that compiles its kernels on first use), tyro (the
# benchmarks' command lines), lpips (imported by the training losses).
ROOTS = ("diffusers", "gsplat", "tyro", "lpips")
IMAGE_PACKAGES = Path(__file__).with_name("gpu_image_packages.txt")
PYTHON_VERSION = "3.12"
# pip matches manylinux tags exactly: list the ones wheels use.
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in (17, 24, 27, 28, 31, 34, 35)] + [
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]
# Requirement markers as that machine evaluates them.
TARGET_ENVIRONMENT = {
    **default_environment(),
    "python_version": PYTHON_VERSION,
    "python_full_version": f"{PYTHON_VERSION}.3",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "extra": "",
}


def image_packages(path: Path = IMAGE_PACKAGES) -> dict[str, str | None]:
    """Canonical name -> version where known (lines `name` or `name==version`; # comments)."""
    packages = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            packages[canonicalize_name(name)] = version or None
    return packages


def requirements(wheel: Path) -> list[Requirement]:
    """The wheel's Requires-Dist entries that apply on the GPU machine (no extras)."""
    with zipfile.ZipFile(wheel) as archive:
        metadata_name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = email.parser.Parser().parsestr(archive.read(metadata_name).decode())
    needed = []
    for line in metadata.get_all("Requires-Dist") or []:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate(TARGET_ENVIRONMENT):
            needed.append(requirement)
    return needed


def download(name: str, version: str, dest: Path) -> Path:
    """One wheel for the GPU machine (no dependencies) -> its path in `dest`."""
    with tempfile.TemporaryDirectory() as scratch:
        command = [
            sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
            "--python-version", PYTHON_VERSION, "--implementation", "cp", "--abi", "cp312", "--abi", "abi3",
            "--abi", "none", *[arg for platform in PLATFORMS for arg in ("--platform", platform)],
            "--dest", scratch, f"{name}=={version}",
        ]
        result = subprocess.run(command, capture_output=True, text=True)
        wheels = list(Path(scratch).glob("*.whl"))
        if result.returncode or len(wheels) != 1:
            raise SystemExit(f"no wheel of {name}=={version} for Python {PYTHON_VERSION} x86-64: {result.stderr.strip()[-600:]}")
        target = dest / wheels[0].name
        if not target.exists():
            wheels[0].replace(target)
        return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=Path(".gpu-wheels"))
    parser.add_argument("--max-mib", type=float, default=60.0)
    args = parser.parse_args()
    args.dest.mkdir(parents=True, exist_ok=True)
    image = image_packages()
    wanted: dict[str, Path] = {}
    queue = [canonicalize_name(name) for name in ROOTS]
    problems = []
    while queue:
        name = queue.pop(0)
        if name in wanted or name in image:
            continue
        if name == "torch" or name.startswith("nvidia-"):
            raise SystemExit(f"{name} is not in {IMAGE_PACKAGES.name}, but torch and CUDA libraries never travel")
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            raise SystemExit(f"{name} is needed on the GPU machine but not installed here: install it (make setup)") from None
        wanted[name] = download(name, version, args.dest)
        for requirement in requirements(wanted[name]):
            dependency = canonicalize_name(requirement.name)
            known = image.get(dependency)
            if known and not requirement.specifier.contains(known, prereleases=True):
                problems.append(f"{name} needs {requirement}, the image has {dependency} {known}")
            queue.append(dependency)
    keep = {path.name for path in wanted.values()}
    for stale in args.dest.glob("*.whl"):
        if stale.name not in keep:
            stale.unlink()
    total = 0
    for name, path in sorted(wanted.items()):
        size = path.stat().st_size
        total += size
        print(f"{size / 2**20:8.2f} MiB  {path.name}")
    print(f"{total / 2**20:8.2f} MiB  total, {len(wanted)} wheels in {args.dest} (limit {args.max_mib:g} MiB)")
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    if total > args.max_mib * 2**20:
        raise SystemExit(f"the wheels take {total / 2**20:.1f} MiB, over the {args.max_mib:g} MiB limit")


if __name__ == "__main__":
    main()
