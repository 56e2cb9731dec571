"""Library boundaries: no import cycles among difix3d's modules, no nerfstudio import, no child processes."""

from __future__ import annotations

import ast
from pathlib import Path

LIBRARY = Path(__file__).resolve().parents[1] / "difix3d"


def imported_modules(path: Path) -> set[str]:
    """The difix3d modules a file imports anywhere (also inside functions), except for type checking only."""
    tree = ast.parse(path.read_text())
    type_checking = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for node in ast.walk(block)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_checking:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            # `from difix3d.data import sfm` imports the module difix3d.data.sfm
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.startswith(("difix3d.", "nerfstudio"))}


def import_graph() -> dict[str, set[str]]:
    modules = {".".join(("difix3d", *path.relative_to(LIBRARY).with_suffix("").parts)).removesuffix(".__init__"): path
               for path in LIBRARY.rglob("*.py")}  # fmt: skip
    return {name: imported_modules(path) for name, path in modules.items()}


def test_no_import_cycles_in_the_library():
    full = import_graph()
    graph = {name: {other for other in imports if other in full} for name, imports in full.items()}
    visiting, done, cycles = [], set(), []

    def visit(module: str) -> None:
        if module in visiting:
            cycles.append(visiting[visiting.index(module) :] + [module])
            return
        if module in done:
            return
        visiting.append(module)
        for other in sorted(graph[module]):
            visit(other)
        visiting.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)
    assert not cycles, " ; ".join(" -> ".join(cycle) for cycle in cycles)


def test_the_library_never_imports_nerfstudio():
    offenders = {name: sorted(i for i in imports if i.startswith("nerfstudio")) for name, imports in import_graph().items()}
    # The one exception: `difix3d curate --reconstructor nerfstudio` loads the plugin's reconstructor when chosen.
    offenders["difix3d.data.curation"] = [i for i in offenders["difix3d.data.curation"] if not i.startswith("nerfstudio_plugin.reconstructor")]
    assert {name: imports for name, imports in offenders.items() if imports} == {}


def test_the_library_runs_no_programs():
    """No child processes (nerfstudio's tools, pip) from library code: entry points run those."""
    offenders = [path.name for path in LIBRARY.rglob("*.py") if "subprocess" in path.read_text() or "ns-train" in path.read_text()]
    assert offenders == []


def test_configs_saved_before_the_subpackages_still_load():
    """nerfstudio's config.yml names the classes of the run's settings; runs saved when the core's
    modules were `difix3d.progressive` and `difix3d.core` must still open (ns-render, ns-eval, resume)."""
    import yaml

    from difix3d.core.progressive import ProgressiveConfig
    from difix3d.core.steps import EnhancerConfig

    saved = "progressive: !!python/object:difix3d.progressive.ProgressiveConfig {num_refs: 2}\n" \
            "enhancer: !!python/object:difix3d.core.EnhancerConfig {num_refs: 3}\n"  # fmt: skip
    loaded = yaml.load(saved, Loader=yaml.Loader)  # what nerfstudio's eval_setup does
    assert loaded["progressive"] == ProgressiveConfig(num_refs=2) and loaded["enhancer"] == EnhancerConfig(num_refs=3)
