"""Import contracts: no cycles between the packages and between the router's parts, and
the engine manager depends on the router's shared part only (import-linter contracts in
pyproject.toml, `lint-imports`; and the same rules computed here from the import graph,
so that a module added later is covered without editing a list)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[2]
GRAPH = grimp.build_graph(
    "deepinfer_router", "deepinfer_engine", exclude_type_checking_imports=True
)


def part(module: str) -> str:
    """The part of the code base a module belongs to."""
    names = module.split(".")
    if names[0] == "deepinfer_engine":
        return "engines"
    if module in ("deepinfer_router.app", "deepinfer_router.cli"):
        return "wiring"
    if len(names) > 1 and names[1] in ("api", "registry", "routing", "shared"):
        return names[1]
    return "core"  # the router's flat modules: proxy, fleet, admission, ...


def test_lint_imports_contracts_kept() -> None:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe, "import-linter is a test dependency"
    run = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]


def test_forbidden_lists_name_every_router_module_but_the_shared_part() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    engines_contract = config["contracts"][0]
    listed = set(engines_contract["forbidden_modules"])
    top = {".".join(m.split(".")[:2]) for m in GRAPH.modules
           if m.startswith("deepinfer_router.") and not m.startswith("deepinfer_router.shared")}
    assert top == listed, f"update pyproject.toml: missing {top - listed}, extra {listed - top}"


def test_engine_manager_imports_only_the_shared_part() -> None:
    for module in GRAPH.modules:
        if part(module) != "engines":
            continue
        for imported in GRAPH.find_modules_directly_imported_by(module):
            if imported.startswith("deepinfer_router"):
                assert imported.startswith("deepinfer_router.shared"), f"{module} -> {imported}"


def test_no_cycles_between_parts() -> None:
    edges: dict[str, set[str]] = {}
    for module in GRAPH.modules:
        for imported in GRAPH.find_modules_directly_imported_by(module):
            a, b = part(module), part(imported)
            if a != b:
                edges.setdefault(a, set()).add(b)
    # Depth-first search for a back edge.
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path, node, nxt]))
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    assert not edges.get("shared"), "the shared part imports nothing of ours"
