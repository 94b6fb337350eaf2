"""README.md is the ten-minute page: short, its commands and curl examples true, every link alive.

* README.md is at most 150 lines (the details live in docs/);
* every relative link in README.md and the docs this page leads to resolves to a file or folder
  of the repository (`#anchors` stripped; http(s), mailto and same-page links skipped);
* "The two commands" are `bash scripts/serve.sh` and `bash scripts/test.sh`, and those scripts do
  what README says (set-up from scripts/setup.sh, then `metalora serve` / pytest with the
  arguments; the torch pin README names is the one setup.sh installs);
* every path the tour table names exists;
* the curl examples use the fields the API takes: the multipart fields of /v1/predict and
  /v1/knn, and a /v2 infer body that fits the protocol's schema with real input/output names;
* the thumbnail example answers a picture on a live server (the session's `shipped_server`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest

from .conftest import needs_shared, run_metalora

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = [README, *(ROOT / "docs" / n for n in ("api.md", "deploy.md", "benchmarks.md", "models.md"))]

FENCE = re.compile(r"^```.*?^```[ \t]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*([^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _prose(text: str) -> str:
    """The text outside code: links inside code blocks and `code` spans are not links."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def _blocks(text: str) -> list[str]:
    return [m.group(0) for m in FENCE.finditer(text)]


def _section(text: str, title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\s*$(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert m, f"README.md has no section '## {title}'"
    return m.group(1)


def test_readme_is_at_most_150_lines():
    n = len(_text(README).splitlines())
    assert n <= 150, f"README.md has {n} lines; at most 150 (move details into docs/)"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc: Path):
    assert doc.is_file(), f"{doc.relative_to(ROOT)} is missing"
    broken = []
    for target in LINK.findall(_prose(_text(doc))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # http(s):, mailto:, ... and links within the page
        path = target.split("#", 1)[0].split("?", 1)[0]
        if not (doc.parent / path).resolve().exists():
            broken.append(target)
    assert not broken, f"{doc.relative_to(ROOT)}: links that resolve to nothing: {broken}"


def test_the_link_pattern_finds_links():
    """A guard on the test itself: the pattern sees plain links, image links and titled links."""
    sample = "see [a](docs/a.md#x), ![b](img/b.png) and [e](e.md \"title\"); `[no](code.md)`\n```\n[no](block.md)\n```\n"
    assert LINK.findall(_prose(sample)) == ["docs/a.md#x", "img/b.png", "e.md"]


def test_readme_links_every_doc():
    links = set(LINK.findall(_prose(_text(README))))
    for doc in ("docs/api.md", "docs/deploy.md", "docs/benchmarks.md", "docs/results.md", "docs/architecture.md",
                "docs/models.md", "research/NOTES.md"):
        assert doc in links, f"README.md does not link {doc}"


def test_the_two_commands_are_the_scripts():
    text = _text(README)
    section = _section(text, "The two commands")
    commands = [line.split("#", 1)[0].strip() for b in _blocks(section) for line in b.splitlines()[1:-1]]
    commands = [c for c in commands if c]
    assert commands == ["bash scripts/serve.sh", "bash scripts/test.sh"], commands
    for script in ("serve.sh", "test.sh", "setup.sh"):
        assert (ROOT / "scripts" / script).is_file(), f"scripts/{script} is missing"

    serve, test, setup = (_text(ROOT / "scripts" / s) for s in ("serve.sh", "test.sh", "setup.sh"))
    for body in (serve, test):
        assert re.search(r'^source "\$\(dirname "\$\{BASH_SOURCE\[0\]\}"\)/setup\.sh"', body, re.M), "must source setup.sh"
    assert re.search(r'^exec metalora serve "\$@"\s*$', serve, re.M), "serve.sh must end in `metalora serve` with its arguments"
    assert re.search(r'^exec python -m pytest "\$@"\s*$', test, re.M), "test.sh must run pytest with its arguments"

    # What README says the set-up installs is what setup.sh installs.
    pins = re.findall(r'"(torch(?:vision)?==[\d.]+)"', setup)
    assert pins and all(p in section for p in pins), f"README's torch pin differs from scripts/setup.sh: {pins}"
    assert '-e ".[dev,research]"' in setup and '.[dev,research]' in section
    assert "python3.11" in setup and "Python 3.11" in section
    # Every `bash scripts/...` README names, anywhere, exists.
    for script in re.findall(r"bash (scripts/[\w.-]+\.sh)", text):
        assert (ROOT / script).is_file(), f"README names {script}, which does not exist"


def test_every_path_in_the_tour_exists():
    table = _section(_text(README), "A short tour")
    rows = [r for r in table.splitlines() if r.startswith("| `")]
    assert len(rows) >= 10, "the tour table is gone"
    missing = []
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        top = cells[0].strip("`")
        if not (ROOT / top).exists():
            missing.append(top)
            continue
        for name in re.findall(r"`([\w.-]+(?:/[\w.-]+)*/?)`", cells[1]):
            if not (name.endswith("/") or re.search(r"\.(py|proto|sh|md|yml|yaml|json)$", name) or name == "Dockerfile"):
                continue  # a name in prose (`metalora serve`, `AdapterRef`), not a path
            if not ((ROOT / top / name).exists() or (ROOT / name).exists()):
                missing.append(f"{top}{name}")
    assert not missing, f"README's tour names paths that do not exist: {missing}"


def _curls(text: str) -> list[str]:
    """Each `curl` command of README's code blocks: `\\` continuations joined, and a quoted
    argument that spans lines read to its closing quote."""
    out = []
    for block in _blocks(text):
        lines = [line for line in block.splitlines()[1:-1] if not line.lstrip().startswith("#")]
        lines = "\n".join(lines).replace("\\\n", " ").splitlines()
        i = 0
        while i < len(lines):
            if lines[i].startswith("curl "):
                cmd = [lines[i]]
                while "\n".join(cmd).replace('\\"', "").count('"') % 2 and i + 1 < len(lines):
                    i += 1
                    cmd.append(lines[i])
                out.append("\n".join(cmd))
            i += 1
    return out


def test_the_curl_examples_use_the_api_fields():
    from service.http.schemas import KnnRequest, PredictRequest
    from service.http.v2_schemas import InferRequestBody
    from service.oip.model import INPUTS, OUTPUTS

    curls = _curls(_text(README))
    routes = {}
    for c in curls:
        m = re.search(r"localhost:8000(/\S+?)(?=[\s\"']|$)", c)
        assert m, c
        routes.setdefault(m.group(1), c)
    for route, model in (("/v1/predict", PredictRequest), ("/v1/knn", KnnRequest)):
        assert route in routes, f"README has no curl example for {route}"
        fields = re.findall(r"-F (\w+)=", routes[route])
        assert "images" in fields and re.search(r"-F images=@\S+", routes[route]), f"{route}: not a multipart image upload"
        unknown = set(fields) - set(model.model_fields)
        assert not unknown, f"README's {route} example sends fields the API does not take: {unknown}"

    infer = [c for r, c in routes.items() if re.fullmatch(r"/v2/models/[\w.@-]+(/versions/\w+)?/infer", r)]
    assert infer, "README has no /v2 infer example"
    body = re.search(r'-d "(.*)"\s*$', infer[0], re.S).group(1)
    body = body.replace('\\"', '"').replace("$(base64 -w0 cat.jpg)", "AAAA")
    req = InferRequestBody.model_validate(json.loads(body))
    assert [i.name for i in req.inputs] and all(i.name in INPUTS and i.datatype == INPUTS[i.name] for i in req.inputs)
    assert all(o.name in OUTPUTS for o in req.outputs or [])


@pytest.fixture(scope="module")
def server(shipped_server):
    return shipped_server


@pytest.mark.slow  # a real server
@pytest.mark.timeout(300)
@needs_shared("cifar10", "train.zip")
def test_readme_thumbnail_example_answers_a_picture(server):
    """The README's example, after the install step it names (`metalora thumbnails`, which
    `scripts/serve.sh` runs): the shipped bundles carry no pictures of their own."""
    readme = (ROOT / "README.md").read_text()
    path = re.search(r"localhost:8000(/v1/adapters/\S+/thumbnail)", readme).group(1)
    ref = re.search(r"/v1/adapters/([^/]+)/gallery", path).group(1)
    made = run_metalora("thumbnails", ref, "--gallery-dir", server.env["METALORA_GALLERY_DIR"])
    assert made.returncode == 0, made.stderr
    r = httpx.get(server.url + path)
    assert r.status_code == 200 and r.headers["content-type"] == "image/webp", r.text
