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


# ------------------------------------------------------------------------ one data plane (issue 31)
FRONT_DOORS = ("service.http", "service.grpc", "service.oip")  # the protocols' packages
ENTRY_POINTS = {"service.cli", "service.launch"}  # the process's start (assembles the doors) and the tests' launcher
CORE = sorted(m for m in MODULES if m.split(".")[0] == "service" and not m.startswith(FRONT_DOORS) and m not in ENTRY_POINTS and m != "service")
WEB = ("fastapi", "starlette", "uvicorn")


def _third_party(path: Path) -> set[str]:
    """Top-level names of every module `path` imports that is not the project's."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module.split(".")[0])
    return out - set(PACKAGES)


def test_the_core_is_seen():
    assert {"service.dataplane", "service.errors", "service.adapters", "service.batcher", "service.galleries.manager"} <= set(CORE)


@pytest.mark.parametrize("module", CORE)
def test_the_core_knows_no_protocol(module):
    """A core module imports no front door and no web or RPC framework, and speaks no HTTP status."""
    doors = sorted(t for t in GRAPH[module] if t.startswith(FRONT_DOORS))
    assert not doors, f"{module} imports front doors: {doors}"
    frameworks = sorted(_third_party(MODULES[module]) & {*WEB, "grpc"})
    assert not frameworks, f"{module} imports {frameworks}"
    names = {n.id for n in ast.walk(ast.parse(MODULES[module].read_text())) if isinstance(n, ast.Name)}
    names |= {n.attr for n in ast.walk(ast.parse(MODULES[module].read_text())) if isinstance(n, ast.Attribute)}
    assert not names & {"HTTPException", "status_code"}, f"{module} speaks HTTP: {sorted(names & {'HTTPException', 'status_code'})}"


def _reach(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        parts = m.split(".")  # importing a module runs its packages' __init__ too
        todo += [".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in MODULES]
        todo += GRAPH[m]
    return seen


def test_the_grpc_door_reaches_no_web_framework():
    reached = _reach("service.grpc.server")
    assert "service.dataplane" in reached  # the scan follows the edges
    bad = sorted(f"{m} imports {sorted(_third_party(MODULES[m]) & set(WEB))}" for m in reached if _third_party(MODULES[m]) & set(WEB))
    assert not bad, f"the gRPC door reaches a web framework: {bad}"


def _at_parses(path: Path) -> list[str]:
    """Places that take a string apart at "@": x.split("@"), .rsplit, .partition, .rpartition, "@" in x."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("split", "rsplit", "partition", "rpartition"):
            if node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value == "@":
                out.append(f"{path.relative_to(ROOT)}:{node.lineno}")
        if isinstance(node, ast.Compare) and isinstance(node.left, ast.Constant) and node.left.value == "@" and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops):
            out.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return out


def test_adapter_references_are_parsed_in_one_module():
    files = [p for pkg in (*PACKAGES, "research") for p in sorted((ROOT / pkg).rglob("*.py"))]
    assert _at_parses(ROOT / "metalora" / "refs.py"), "the scan finds nothing even where the parsing is"
    places = [s for p in files if p != ROOT / "metalora" / "refs.py" for s in _at_parses(p)]
    assert not places, f"'@' is parsed outside metalora/refs.py (use AdapterRef): {places}"
