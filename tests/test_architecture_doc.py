"""docs/architecture.md names only what exists: every repository path it mentions is a file or
folder, and the function or class each step of its request walks opens with is defined in that
step's file."""

from __future__ import annotations

import re

from .conftest import ROOT

DOC = (ROOT / "docs" / "architecture.md").read_text()
PATH = re.compile(r"`((?:metalora|metalora_serve|service|bench|clients|research|tests|docs|deploy|model_store)/[\w./-]*)`")
STEP = re.compile(r"\d+\. \*\*`([\w/.]+\.py)`\*\* — `([A-Za-z_]\w*)")


def test_every_path_named_exists():
    paths = set(PATH.findall(DOC))
    assert len(paths) > 30, f"the scan finds too few paths ({len(paths)}): the pattern no longer matches the doc"
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"


def test_each_step_opens_with_what_its_file_defines():
    steps = STEP.findall(DOC)
    assert len(steps) >= 8, f"the scan finds {len(steps)} steps: the pattern no longer matches the doc"
    bad = [f"{path}: {name}" for path, name in steps if not re.search(rf"^\s*(?:async\s+)?(?:def|class)\s+{name}\b|^{name}\s*=", (ROOT / path).read_text(), re.M)]
    assert not bad, f"steps open with what their file does not define: {bad}"
