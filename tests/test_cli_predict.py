"""`metalora predict` (in-process) and `metalora-client` against a real `metalora serve` on the
shipped model store: the same image and adapter must give the same scores and `unknown` flag
(break report, findings 7 and 16), and user errors are one line, not a traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest
from PIL import Image
from typer.testing import CliRunner

from clients.cli import app as client_app
from metalora.cli import app as lib_app

from .conftest import ROOT

# Pinned to the shipped calibrated version, so a newer cifar10 in the store does not change what is tested.
CIFAR = "cifar10@6"
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def cat(tmp_path_factory):
    """skimage's chelsea (a cat photo) as a JPEG file."""
    import skimage.data

    path = tmp_path_factory.mktemp("imgs") / "chelsea.jpg"
    Image.fromarray(skimage.data.chelsea()).save(path, "JPEG")
    return path


@pytest.fixture(scope="module")
def server(shipped_server):
    """The session's shared server on the shipped store (tests/conftest.py); the tests name cifar10@6."""
    return shipped_server


def _served(server, path, adapter: str, top_k: int) -> dict:
    r = httpx.post(server.url + "/v1/predict", files=[("images", (path.name, path.read_bytes()))], data={"adapter": adapter, "top_k": str(top_k)}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["results"][0]


def test_in_process_predict_matches_server_scores_and_unknown(server, cat):
    """cifar10@6 is calibrated (T = 1.83, k-NN threshold): the CLI used plain softmax (with cifar10@2,
    cat 0.999 against the server's 0.996) and never said unknown, which the server said for this
    photo with cifar10@3; both must give the same scores and the same `unknown` flag."""
    manifest = json.loads((ROOT / "model_store/adapters/cifar10/6/manifest.json").read_text())
    assert manifest["calibration"]["temperature"] != 1.0 and manifest["calibration"]["knn_threshold"] is not None
    want = _served(server, cat, CIFAR, 10)
    r = CliRunner().invoke(lib_app, ["predict", "--adapter", CIFAR, "--top-k", "10", "--device", "cpu", "--json", str(cat)])
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)[0]
    assert (got["adapter"], got["version"]) == (want["adapter"], want["version"]) == ("cifar10", "6")
    assert [p["label"] for p in got["predictions"]] == [p["label"] for p in want["predictions"]]
    assert max(abs(a["score"] - b["score"]) for a, b in zip(got["predictions"], want["predictions"])) < 1e-5
    assert isinstance(want["unknown"], bool) and got["unknown"] == want["unknown"]
    assert want["predictions"][0]["label"] == "cat"  # issue #11: chelsea is a cat for cifar10
    r = CliRunner().invoke(lib_app, ["predict", "--adapter", CIFAR, "--device", "cpu", str(cat)])
    assert r.exit_code == 0 and "[cifar10@6] cat " in r.stdout and ("unknown" in r.stdout) == want["unknown"], r.output


def test_in_process_base_matches_server_and_prints_base(server, cat):
    want = _served(server, cat, "base", 3)
    r = CliRunner().invoke(lib_app, ["predict", "--top-k", "3", "--device", "cpu", "--json", str(cat)])
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)[0]
    assert "unknown" not in got and "unknown" not in want
    assert max(abs(a["score"] - b["score"]) for a, b in zip(got["predictions"], want["predictions"])) < 1e-5
    r = CliRunner().invoke(lib_app, ["predict", "--top-k", "1", "--device", "cpu", str(cat)])
    assert r.exit_code == 0 and f"{cat}: [base] " in r.stdout and "[base@]" not in r.stdout, r.output


def test_in_process_predict_fans_out_over_repeated_adapters_like_the_server(server, cat):
    """`--adapter` repeated: every image through every adapter, image-major, as /v1/predict answers
    a list of adapters (it kept only the last one, silently); here across two cuts (gtsrb's is blocks[:5])."""
    r = httpx.post(server.url + "/v1/predict", files=[("images", (cat.name, cat.read_bytes()))] * 2,
                   data={"adapter": [CIFAR, "gtsrb"], "top_k": "3"}, timeout=120)
    assert r.status_code == 200, r.text
    want = r.json()["results"]
    got = CliRunner().invoke(lib_app, ["predict", "--adapter", CIFAR, "--adapter", "gtsrb", "--top-k", "3", "--device", "cpu", "--json", str(cat), str(cat)])
    assert got.exit_code == 0, got.output
    got = json.loads(got.stdout)
    assert [(g["adapter"], g["version"]) for g in got] == [(w["adapter"], w["version"]) for w in want]
    assert [g["adapter"] for g in got] == ["cifar10", "gtsrb"] * 2
    for g, w in zip(got, want):
        assert [p["label"] for p in g["predictions"]] == [p["label"] for p in w["predictions"]]
        assert max(abs(a["score"] - b["score"]) for a, b in zip(g["predictions"], w["predictions"])) < 1e-4


def test_in_process_predict_user_errors_are_one_line(cat, tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    cases = {
        ("--adapter", "nope", str(cat)): "adapter 'nope'",
        (str(cat), str(text)): f"{text}: bytes are not an image",
        (str(tmp_path / "missing.jpg"),): f"{tmp_path / 'missing.jpg'}: No such file",
    }
    for args, message in cases.items():
        r = CliRunner().invoke(lib_app, ["predict", "--device", "cpu", *args])
        assert r.exit_code == 2, (args, r.output)
        assert r.stdout == "" and r.stderr.startswith("error: ") and message in r.stderr, (args, r.stderr)
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.output, r.output


@pytest.fixture(scope="module")
def cup(tmp_path_factory):
    """skimage's coffee (a cup: none of CIFAR-10's classes) as a JPEG file."""
    import skimage.data

    path = tmp_path_factory.mktemp("imgs") / "coffee.jpg"
    Image.fromarray(skimage.data.coffee()).save(path, "JPEG")
    return path


def test_client_tables_show_unknown(server, cup):
    want = _served(server, cup, CIFAR, 3)
    assert want["unknown"] is True  # the coffee cup: a label, and the flag that it is none of them
    for cmd in ("predict", "knn"):
        r = CliRunner().invoke(client_app, [cmd, "--url", server.url, "--adapter", CIFAR, str(cup)], env={"COLUMNS": "200"})
        assert r.exit_code == 0, r.output
        assert "unknown (" in r.stdout, (cmd, r.stdout)  # the flag, then the best label in brackets
    r = CliRunner().invoke(client_app, ["predict", "--url", server.url, "--adapter", "base", str(cup)], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "unknown" not in r.stdout, r.output


def test_client_cli_names_the_bad_file_of_a_batch(server, cat, tmp_path):
    """One bad file used to fail the run as `422 empty_image: images[1]…`, with no file name."""
    d = tmp_path / "batch"
    d.mkdir()
    (d / "a.jpg").write_bytes(cat.read_bytes())
    (d / "b.jpg").write_bytes(b"")
    (d / "c.png").write_bytes(cat.read_bytes())
    r = CliRunner().invoke(client_app, ["predict", "--url", server.url, "--adapter", "base", str(d)])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.output
    assert f"{d / 'b.jpg'}: 422 " in r.stderr and "images[1]" in r.stderr, r.stderr


def test_client_cli_directory_scan_sends_heif_and_avif(server, cat, tmp_path):
    """`metalora-client predict DIR` skipped .heic/.heif/.avif, formats the server decodes."""
    import pillow_heif
    from PIL import features

    img = Image.open(cat)
    d = tmp_path / "phone"
    d.mkdir()
    pillow_heif.from_pillow(img).save(d / "a.heic")
    names = ["a.heic"]
    if features.check("avif"):
        img.save(d / "b.avif")
        names.append("b.avif")
    r = CliRunner().invoke(client_app, ["predict", "--url", server.url, "--adapter", "base", "--json", str(d)])
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.stdout)["results"]) == len(names)


@pytest.mark.parametrize("module", ["clients", "clients.cli"])
def test_client_runs_as_a_module(module):
    r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
    assert r.returncode == 0 and "predict" in r.stdout and "Client for a running MetaLoRA service" in r.stdout, r.stdout + r.stderr


def test_directory_scan_covers_every_format_the_service_decodes():
    """The client's suffix list (it imports nothing of the server) against the service's formats:
    every suffix Pillow (with pillow-heif) registers for one of metalora.images.SUPPORTED_FORMATS."""
    from clients.cli import IMAGE_SUFFIXES
    from metalora.images import SUPPORTED_FORMATS  # registers the HEIF opener

    registered = {ext for ext, fmt in Image.registered_extensions().items() if fmt in SUPPORTED_FORMATS}
    assert {".heic", ".heif", ".avif", ".mpo"} <= registered
    assert registered <= IMAGE_SUFFIXES
    assert {ext for ext, fmt in Image.registered_extensions().items() if fmt not in SUPPORTED_FORMATS} & IMAGE_SUFFIXES == set()
