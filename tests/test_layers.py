"""The package's import structure against the layer list of docs/design.md.

Every module's imports (absolute and relative, at any depth: function-level imports
count) are read with ``ast``. A module may import its own layer or a lower one, never a
higher one, and no modules may import each other in a loop. The layer list is read from
docs/design.md, section 'Layers', so the document and the code cannot drift apart.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "lightning_distill"
PACKAGE_DIR = ROOT / PACKAGE
DESIGN = ROOT / "docs" / "design.md"
_LAYER_LINE = re.compile(r"^layer (\d+): (.+)$")


def read_layers() -> dict[str, int]:
    """``{"lightning_distill.data": 1, ..., "lightning_distill": 5}`` from docs/design.md."""
    text = DESIGN.read_text(encoding="utf-8")
    section = text.split("## 1. Layers", 1)[1].split("\n## ", 1)[0]
    block = section.split("```text", 1)[1].split("```", 1)[0]
    layers: dict[str, int] = {}
    for line in block.strip().splitlines():
        m = _LAYER_LINE.match(line.strip())
        assert m, f"docs/design.md: unreadable layer line {line!r}"
        for name in m.group(2).split():
            full = PACKAGE if name == "(package)" else f"{PACKAGE}.{name}"
            assert full not in layers, f"docs/design.md lists {name} twice"
            layers[full] = int(m.group(1))
    return layers


def package_modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> file (a package is its __init__.py)."""
    out = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return name in modules and modules[name].name == "__init__.py"


def imports_of(name: str, modules: dict[str, Path]) -> set[str]:
    """The package modules that module ``name`` imports (anywhere in its code)."""
    tree = ast.parse(modules[name].read_text(encoding="utf-8"), str(modules[name]))
    here = name if _is_package(name, modules) else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # ``from pkg import sub`` imports the submodule when there is one
            targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in modules else stem
                       for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # ``import a.b.c`` of a non-module c
                target = target.rpartition(".")[0]
            if target.split(".")[0] == PACKAGE and target != name:
                found.add(target)
    return found


def layer_of(name: str, layers: dict[str, int]) -> int | None:
    """The layer of the longest listed name that is ``name`` or a package above it."""
    best = None
    for listed, layer in layers.items():
        if name == listed or name.startswith(listed + "."):
            if best is None or len(listed) > len(best[0]):
                best = (listed, layer)
    return None if best is None else best[1]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


# Violations being removed on another branch (functional.evaluation.make_dsa builds the
# evaluation's DSA); delete an entry once its import is gone. Nothing else may be added.
KNOWN_VIOLATIONS: set[tuple[str, str]] = set()

MODULES = package_modules()
LAYERS = read_layers()
GRAPH = {name: imports_of(name, MODULES) for name in MODULES}


def test_layer_list_names_existing_modules_only():
    missing = [name for name in LAYERS if name not in MODULES]
    assert not missing, f"docs/design.md lists modules that do not exist: {missing}"


def test_every_module_has_a_layer():
    unplaced = [name for name in MODULES if layer_of(name, LAYERS) is None]
    assert not unplaced, f"add these modules to the layer list of docs/design.md: {unplaced}"


def test_no_module_imports_a_higher_layer():
    bad = [
        f"{name} (layer {layer_of(name, LAYERS)}) imports {target} "
        f"(layer {layer_of(target, LAYERS)})"
        for name, targets in GRAPH.items()
        for target in sorted(targets)
        if layer_of(target, LAYERS) > layer_of(name, LAYERS)
        and (name, target) not in KNOWN_VIOLATIONS
    ]
    assert not bad, "imports of a higher layer (docs/design.md, section 'Layers'):\n" + "\n".join(
        bad)


def test_no_import_cycles():
    loops = _cycles(GRAPH)
    assert not loops, f"modules importing each other in a loop: {loops}"


# ------------------------------------------------------------ the checker itself
def test_import_resolution(tmp_path):
    assert "lightning_distill.data.augment" in GRAPH["lightning_distill.modules.expert"]
    # ``from .. import x`` and function-level imports are seen
    assert "lightning_distill.models" in GRAPH["lightning_distill.trajectories"]
    assert "lightning_distill.stages.experts" in GRAPH["lightning_distill.cli"]  # in a method
    assert layer_of("lightning_distill.data.datasets.loaders", LAYERS) == LAYERS[
        "lightning_distill.data"]
    assert layer_of("lightning_distill", LAYERS) == max(LAYERS.values())


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
])
def test_cycle_finder(graph, expected):
    assert _cycles(graph) == expected
