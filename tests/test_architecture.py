"""The layers stay layered: the model library imports nothing above it, and no module cycles.

Imports are read with `ast` from the source (function-level imports included: a lazy import is
still a dependency), so the check needs no package to be importable.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("metalora", "service", "bench", "clients", "metalora_serve")
# Who may import whom: a package imports only itself and the packages listed for it.
ALLOWED = {
    "metalora": {"metalora"},
    "service": {"service", "metalora"},
    "clients": {"clients"},
    "bench": {"bench", "service", "metalora", "clients"},
    "metalora_serve": {"metalora_serve", "metalora", "service", "bench", "clients"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Project modules that `name` imports; `from pkg import sub` counts `pkg.sub` when it is a module."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base if is_pkg else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known and "." in t:
                t = t.rsplit(".", 1)[0]
            if t in known and t != name:
                out.add(t)
    return out


MODULES = _modules()
GRAPH = {name: _imports(name, path, MODULES) for name, path in MODULES.items()}


def test_the_scan_sees_the_known_edges():
    # A parser that found nothing would pass every check below; these edges exist by design.
    assert "service.container" in GRAPH["service.http.app"]
    assert "metalora.features" in GRAPH["metalora.evaluate"]
    assert {"metalora.cli", "service.cli", "bench.cli"} <= GRAPH["metalora_serve.cli"]


@pytest.mark.parametrize("pkg", sorted(ALLOWED))
def test_no_back_edges(pkg):
    bad = sorted(f"{m} -> {t}" for m, ts in GRAPH.items() if m.split(".")[0] == pkg for t in ts if t.split(".")[0] not in ALLOWED[pkg])
    assert not bad, f"{pkg} imports layers it must not: {bad}"


def test_no_import_cycles():
    # Package __init__ files re-export their submodules; an edge from a submodule back to its own
    # package's __init__ is the usual `from . import x` and not a design cycle, so drop it.
    graph = {m: {t for t in ts if not (m.startswith(t + ".") and MODULES[t].name == "__init__.py")} for m, ts in GRAPH.items()}
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as e:
        pytest.fail(f"import cycle: {' -> '.join(e.args[1])}")


def test_app_module_only_assembles():
    lines = (ROOT / "service" / "http" / "app.py").read_text().count("\n")
    assert lines <= 150, f"service/http/app.py has {lines} lines; routes, parsing and middleware live in their own modules"
