"""The import structure of ``kiln``: the contracts in ``.importlinter`` hold, and no cycle exists.

``make lint`` runs ``lint-imports`` too; this test puts the same check in ``make test`` (and so in
CI), so a new upward import or import cycle fails the suite even when lint is not run. Every
import counts, including those inside functions and under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import configparser
import subprocess
import sys

import pytest
from runners import ROOT

pytest.importorskip(
    "importlinter", reason="import-linter is not installed (pip install -e '.[dev]')"
)
grimp = pytest.importorskip("grimp", reason="grimp comes with import-linter, not installed")

CONFIG = ROOT / ".importlinter"
# The root package is a lazy facade: its imports sit under TYPE_CHECKING and never run.
FACADE = "kiln"


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("kiln", cache_dir=None)


def _layer_modules() -> set[str]:
    """Every module named in a layer of the layers contract."""
    parser = configparser.ConfigParser()
    parser.read(CONFIG)
    names: set[str] = set()
    for line in parser["importlinter:contract:layers"]["layers"].split("\n"):
        for sep in ("|", ":"):
            line = line.replace(sep, " ")
        names.update(n.strip("()") for n in line.split())  # "(x)": an optional layer
    return names


def test_import_contracts_hold() -> None:
    code = (
        "import sys; from importlinter.cli import lint_imports; "
        f"sys.exit(lint_imports(config_filename={str(CONFIG)!r}, no_cache=True, no_logo=True))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    broken = proc.stdout[proc.stdout.find("Broken contracts") :] or proc.stdout
    assert proc.returncode == 0, f"lint-imports failed:\n{broken}\n{proc.stderr}"


def test_every_module_has_a_layer(graph: grimp.ImportGraph) -> None:
    """A new module or package must be placed in a layer, or the contract would not see it."""
    named = _layer_modules()
    split = {".".join(n.split(".")[:-1]) for n in named if n.count(".") >= 2}
    missing = [
        m
        for m in sorted(graph.modules)
        if m != FACADE
        and m not in split  # the __init__ of a package whose modules sit in different layers
        and not any(m == n or m.startswith(n + ".") for n in named)
    ]
    assert not missing, f"modules in no layer of {CONFIG.name}: {missing}"


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    component.append(m)
                    if m == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_cycles_are_found() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(edges) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_anywhere_in_kiln(graph: grimp.ImportGraph) -> None:
    edges = {
        m: set() if m == FACADE else set(graph.find_modules_directly_imported_by(m))
        for m in graph.modules
    }
    cycles = _cycles(edges)
    shown = "\n".join(
        " <-> ".join(c) + "\n  " + ", ".join(f"{a} -> {b}" for a in c for b in edges[a] if b in c)
        for c in cycles
    )
    assert not cycles, f"import cycles in kiln:\n{shown}"
