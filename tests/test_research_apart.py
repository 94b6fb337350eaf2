"""The research stays apart from the product (issue 31, item 6).

research/ holds the experiment scripts and their outputs; the served package does not ship it,
does not depend on what only research needs, and no module reaches around the installed packages
by editing sys.path. docs/results.md is a short summary whose every relative link resolves.
"""

from __future__ import annotations

import ast
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

from tests.conftest import ROOT

# What research/ needs beyond the served package (pyproject's `research` extra).
RESEARCH_ONLY = {"scipy", "matplotlib", "mlxtend"}
# The product: what the wheel ships (research/ and tests/ are not in it).
PRODUCT = ("metalora", "metalora_serve", "service", "clients", "bench")


def _tracked_py() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: no tracked files to walk")
    return [ROOT / p for p in out.splitlines() if not p.startswith((".venv/", "venv/")) and (ROOT / p).is_file()]


def _sys_path_edits(tree: ast.AST) -> list[int]:
    """Lines that assign to sys.path, call a method on it (insert, append, extend, ...), or augment it."""

    def is_sys_path(node: ast.AST) -> bool:
        return isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name) and node.value.id == "sys"

    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and is_sys_path(node.func.value):
            lines.append(node.lineno)
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if is_sys_path(t) or (isinstance(t, ast.Subscript) and is_sys_path(t.value)):
                    lines.append(node.lineno)
    return sorted(lines)


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirement_name(req: str) -> str:
    return re.split(r"[\s\[<>=!~;]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _product_imports() -> set[str]:
    """Top-level modules the product packages import, anywhere in a module (lazy imports too)."""
    names = set()
    for p in _tracked_py():
        rel = p.relative_to(ROOT).parts
        if rel[0] not in PRODUCT:
            continue
        for node in ast.walk(ast.parse(p.read_text(), str(p))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def test_no_module_edits_sys_path():
    found = []
    for p in _tracked_py():
        for line in _sys_path_edits(ast.parse(p.read_text(), str(p))):
            found.append(f"{p.relative_to(ROOT)}:{line}")
    assert not found, "sys.path edited (import the installed packages instead; the project is installed editable): " + ", ".join(found)


def test_sys_path_check_sees_every_form():
    src = "import sys\nsys.path.insert(0, 'x')\nsys.path.append('x')\nsys.path = ['x']\nsys.path += ['x']\nsys.path[0:0] = ['x']\nprint(sys.path)\n"
    assert _sys_path_edits(ast.parse(src)) == [2, 3, 4, 5, 6]


def test_research_only_dependencies_are_not_runtime_dependencies():
    """matplotlib and mlxtend are the research extra's, not runtime dependencies (the product
    imports them only optionally: bench's plots, one data source of `metalora train`); scipy
    stays a runtime dependency only while a product module imports it (the temperature fit)."""
    project = _pyproject()["project"]
    runtime = {_requirement_name(r) for r in project["dependencies"]}
    extra = {_requirement_name(r) for r in project["optional-dependencies"]["research"]}
    assert RESEARCH_ONLY <= extra
    assert not runtime & {"matplotlib", "mlxtend"}, f"research-only runtime dependencies: {sorted(runtime & {'matplotlib', 'mlxtend'})}"
    imported = _product_imports()
    unjustified = sorted(d for d in RESEARCH_ONLY & runtime if d not in imported)
    assert not unjustified, f"research-only, not imported by {PRODUCT}, yet a runtime dependency: {unjustified}"


def test_research_is_not_in_the_wheel():
    find = _pyproject()["tool"]["setuptools"]["packages"]["find"]
    include = find.get("include", [])
    assert include, "packages.find must list what the wheel ships (an empty include takes every folder, research/ too)"
    assert not any(re.fullmatch(pat.replace("*", ".*"), name) for pat in include for name in ("research", "research.paper")), include


def test_research_is_not_in_the_docker_context():
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert "research" in patterns or "research/" in patterns
    copies = [ln for ln in (ROOT / "Dockerfile").read_text().splitlines() if ln.startswith("COPY")]
    assert not any("research" in ln for ln in copies), copies


def _slug(heading: str) -> str:
    """GitHub's anchor for a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]|\[|\]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(md: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    in_code = False
    for line in md.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        m = None if in_code else re.match(r"#{1,6}\s+(.*)", line)
        if m:
            s = _slug(m.group(1))
            n = seen.get(s, 0)
            seen[s] = n + 1
            out.add(s if n == 0 else f"{s}-{n}")
    return out


def _relative_links(md: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)
    links = re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", text)
    return [u for u in links if not re.match(r"[a-z][a-z0-9+.-]*:", u)]


def test_results_summary_is_short_and_its_links_resolve():
    page = ROOT / "docs" / "results.md"
    lines = page.read_text().splitlines()
    assert len(lines) <= 250, f"docs/results.md is a summary: {len(lines)} lines (the notebook is research/NOTES.md)"
    links = _relative_links(page)
    assert any("research/NOTES.md" in u for u in links)
    broken = []
    for u in links:
        path, _, anchor = u.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(u)
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            broken.append(u)
    assert not broken, f"docs/results.md: links that resolve to nothing: {broken}"


def test_notes_images_resolve():
    notes = ROOT / "research" / "NOTES.md"
    missing = [u for u in _relative_links(notes) if not (notes.parent / u.partition("#")[0]).exists()]
    assert not missing, missing
