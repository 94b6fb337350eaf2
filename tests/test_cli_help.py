"""The command line starts light, and the environment is read in one place per layer.

* `metalora --help` and `metalora <command> --help` import no heavy module (torch, timm,
  onnxruntime, fastapi, uvicorn, PIL, ...): each command imports them inside its body.
* `metalora serve` refuses a `METALORA_*` variable that nothing reads, in one line, exit code 1.
* No module of metalora/, service/, bench/, metalora_serve/ reads the environment except modules
  named settings.py (and service/launch.py, which copies it to build a child's environment);
  clients/client.py reads the client's two variables.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_metalora

HEAVY = ("torch", "torchvision", "timm", "onnxruntime", "onnx", "fastapi", "uvicorn", "starlette", "PIL", "grpc", "faiss", "sklearn", "skimage")

_PROBE = """
import json, sys
from metalora_serve.cli import app
out = {}
for args in ARGS:
    try:
        app(args)
    except SystemExit:
        pass
    out[" ".join(args)] = sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)
print("PROBE" + json.dumps(out))
"""


def _probe(*arg_lists: list[str]) -> dict[str, list[str]]:
    """The heavy modules loaded after each `metalora ARGS` (cumulative, in order), in a fresh interpreter."""
    code = _PROBE.replace("ARGS", repr([list(a) for a in arg_lists])).replace("HEAVY", repr(HEAVY))
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    print(f"{arg_lists}: {time.perf_counter() - t0:.2f} s")
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout[p.stdout.rindex("PROBE") + len("PROBE"):])


@pytest.mark.parametrize("args", [["--help"], ["serve", "--help"], ["train", "--help"]], ids=" ".join)
def test_help_imports_no_heavy_module(args):
    got = _probe(args)[" ".join(args)]
    assert not got, f"`metalora {' '.join(args)}` imported {got}"


def test_every_command_help_imports_no_heavy_module():
    from metalora_serve.cli import app

    names = [c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands]
    assert {"serve", "train", "bench", "predict", "thumbnails"} <= set(names)
    got = _probe(*[[n, "--help"] for n in names])
    first = next((k for k, v in got.items() if v), None)  # cumulative: the first one that pulled any in
    assert first is None, f"`metalora {first}` imported {got[first]}"


def test_metalora_help_finishes():
    t0 = time.perf_counter()
    r = run_metalora("--help", timeout=120)
    print(f"metalora --help: {time.perf_counter() - t0:.2f} s")  # speed is the benchmarks' to judge; shown here
    assert r.returncode == 0, r.stderr[-2000:]
    assert "serve" in r.stdout and "train" in r.stdout and "bench" in r.stdout


# ------------------------------------------------------------------------------------ unknown variables
@pytest.mark.slow
def test_serve_refuses_an_unknown_variable_in_one_line():
    r = run_metalora("serve", "--port", "1", "--grpc-port", "0", env={"METALORA_MAX_BATCH": "8"}, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and "Traceback" not in r.stderr + r.stdout, r.stderr
    assert "METALORA_MAX_BATCH" in lines[0] and "METALORA_MAX_BATCH_SIZE (max_batch_size)" in lines[0]


def test_the_closest_variable_is_named():
    from service.settings import UnknownSetting, check_environment

    with pytest.raises(UnknownSetting, match=r"^unknown setting METALORA_MAX_BATCH; did you mean METALORA_MAX_BATCH_SIZE \(max_batch_size\)\?$"):
        check_environment({"METALORA_MAX_BATCH": "8", "PATH": "/bin"})
    with pytest.raises(UnknownSetting, match=r"METALORA_SHARE; did you mean METALORA_SHARED \(shared\)"):
        check_environment({"METALORA_SHARE": "/x"})
    with pytest.raises(UnknownSetting, match="also unknown: METALORA_ZZZ"):
        check_environment({"METALORA_NOTHING_LIKE_IT": "1", "METALORA_ZZZ": "1"})
    check_environment({"PATH": "/bin", "HOME": "/root"})


def _settings_classes():
    from bench.settings import BenchSettings
    from metalora_serve.settings import CommandSettings
    from service.settings import Settings

    return [Settings, CommandSettings, BenchSettings]


def test_every_settings_class_and_the_client_are_known():
    """Variables of the other settings classes and of the client are never refused, and each
    variable listed as read elsewhere is read where it says."""
    from service.settings import ELSEWHERE, check_environment, known_variables

    names = {f"METALORA_{f.upper()}" for cls in _settings_classes() for f in cls.model_fields}
    client = set(re.findall(r"METALORA_[A-Z0-9_]+", (ROOT / "clients" / "client.py").read_text()))
    assert client == {"METALORA_URL", "METALORA_ADMIN_TOKEN"}
    assert names | client <= set(known_variables())
    check_environment({n: "1" for n in names | client})
    for name, where in ELSEWHERE.items():
        path = ROOT / where.removeprefix("read by ")
        assert name in names if path.name == "settings.py" else name in path.read_text(), f"{name} is not read by {path}"


def _calls(tree: ast.AST, names: tuple[str, ...]):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in names:
            yield node


def test_what_tests_and_launchers_send_a_server_is_known():
    """Every METALORA_* name in the tests, benchmarks and research scripts, and every keyword
    setting they hand to ServerProcess / Server (service.launch turns them into METALORA_*
    variables), is one the server accepts."""
    from service.settings import Settings, known_variables

    known = set(known_variables())
    deliberate = {"METALORA_MAX_BATCH", "METALORA_SHARE", "METALORA_NOTHING_LIKE_IT", "METALORA_ZZZ", "METALORA_X"}  # this file's refusals
    files = [p for d in ("tests", "bench", "research", "service", "scripts", "deploy") for p in sorted((ROOT / d).rglob("*")) if p.suffix in (".py", ".sh", ".yaml", ".yml")]
    files += [ROOT / "Dockerfile", ROOT / "docker-compose.yml"]
    seen: dict[str, str] = {}
    for p in files:
        for name in re.findall(r"\bMETALORA_[A-Z0-9_]*[A-Z0-9]\b", p.read_text(errors="replace")):
            seen.setdefault(name, str(p.relative_to(ROOT)))
    bad = {n: f for n, f in seen.items() if n not in known and n not in deliberate}
    assert not bad, f"names the server would refuse: {bad}"
    assert {"METALORA_STORE", "METALORA_ONNX_CACHE", "METALORA_CALIBRATION_DATA"} <= set(seen)  # the scan sees them
    params = {"store", "log", "device"}  # ServerProcess's own parameters
    sent: dict[str, str] = {}
    for p in [p for d in ("tests", "bench", "research") for p in sorted((ROOT / d).rglob("*.py"))]:
        tree = ast.parse(p.read_text(), str(p))
        dicts = {t.id: node.value for node in ast.walk(tree) if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
                 and isinstance(node.value.func, ast.Name) and node.value.func.id == "dict" for t in node.targets if isinstance(t, ast.Name)}
        for call in _calls(tree, ("ServerProcess", "Server")):
            for kw in call.keywords:
                if kw.arg is not None:
                    sent.setdefault(kw.arg, str(p.relative_to(ROOT)))
                elif isinstance(kw.value, ast.Name) and kw.value.id in dicts:  # **SETTINGS, **common
                    for k in dicts[kw.value.id].keywords:
                        if k.arg is not None:
                            sent.setdefault(k.arg, str(p.relative_to(ROOT)))
    assert {"admin_token", "max_batch_size", "onnx_cache", "shared", "warmup"} <= set(sent)  # the scan sees them
    bad = {k: f for k, f in sent.items() if k not in params and k not in Settings.model_fields}
    assert not bad, f"keyword settings that are no Settings field: {bad}"


# ------------------------------------------------------------------------------------ who reads the environment
_LAYERS = ("metalora", "service", "bench", "metalora_serve", "clients")
_ALLOWED = {Path("service/launch.py"), Path("clients/client.py")}  # launch copies it for a child; the client's two variables


def _env_reads(path: Path) -> list[str]:
    """`os.environ`, `os.getenv`, `os.environb`, `from os import environ/getenv` and Typer's
    `envvar=` (Click reads the variable) in one module, as `line: what`."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "environb", "getenv", "getenvb", "putenv") and isinstance(node.value, ast.Name) and node.value.id == "os":
            out.append(f"{node.lineno}: os.{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module == "os" and any(a.name in ("environ", "environb", "getenv") for a in node.names):
            out.append(f"{node.lineno}: from os import {', '.join(a.name for a in node.names)}")
        elif isinstance(node, ast.keyword) and node.arg in ("envvar", "auto_envvar_prefix"):
            out.append(f"{node.lineno}: {node.arg}=")
    return out


def test_the_environment_is_read_only_in_settings_modules():
    reads = {}
    for layer in _LAYERS:
        for p in sorted((ROOT / layer).rglob("*.py")):
            rel = p.relative_to(ROOT)
            if p.name != "settings.py" and rel not in _ALLOWED and (found := _env_reads(p)):
                reads[str(rel)] = found
    assert not reads, f"read the environment outside a settings.py: {reads}"
    # The scan finds what it looks for (a checker that saw nothing would pass).
    assert _env_reads(ROOT / "service" / "settings.py") and _env_reads(ROOT / "clients" / "client.py")


def test_command_defaults_come_from_the_environment(monkeypatch, tmp_path):
    """`metalora` fills the library commands' path options from CommandSettings (an option on the
    command line still wins)."""
    from typer.testing import CliRunner

    from metalora.cli import app as library_app
    from metalora_serve.cli import app
    from metalora_serve.settings import CommandSettings

    monkeypatch.setenv("METALORA_CACHE", str(tmp_path / "c"))
    monkeypatch.setenv("METALORA_STORE", str(tmp_path / "nostore"))
    monkeypatch.delenv("METALORA_ONNX_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    m = CommandSettings().default_map()
    assert m["train"] == m["eval"] == m["cache-features"] == {"cache_dir": str(tmp_path / "c")}
    assert m["thumbnails"] == {"store": str(tmp_path / "nostore")} and m["bench-onnx"] == {"onnx_cache": str(tmp_path / "xdg" / "metalora" / "onnx")}
    r = CliRunner().invoke(app, ["thumbnails", "digits"])
    assert r.exit_code == 1 and "nostore is not a model store" in r.output, r.output
    r = CliRunner().invoke(library_app, ["thumbnails", "digits", "--store", str(tmp_path / "other")])
    assert r.exit_code == 1 and "other is not a model store" in r.output  # the library's app: options only
