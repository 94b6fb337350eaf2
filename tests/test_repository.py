"""The model repository: a version is visible only when whole, control modes none / poll /
explicit, the version policy, and what a request sees while a version is copied, corrupted,
completed and deleted — on the repository alone, and against a real server in poll mode."""

from __future__ import annotations

import base64
import io
import json
import shutil
import time
from pathlib import Path

import httpx
import pytest

from metalora.refs import AdapterRef
from metalora.store import ModelStore
from service.errors import DomainError, Kind
from service.launch import ServerProcess
from service.repository import AVAILABLE, INCOMPLETE, INVALID, RETIRED, Policy, Repository, parse_policies

from .conftest import ROOT

SHIPPED = ROOT / "model_store"
TOKEN = "repository-admin-token-0123456789"


def _copy_version(src: Path, dest: Path, *, cut_weights: bool = False, flip: bool = False, manifest_only: bool = False) -> None:
    """Copy a bundle directory the way a careless `cp` does: manifest first, then the files, the
    weights optionally cut short or with one byte flipped."""
    dest.mkdir(parents=True)
    shutil.copy2(src / "manifest.json", dest / "manifest.json")
    if manifest_only:
        return
    for f in sorted(src.iterdir()):
        if f.name == "manifest.json":
            continue
        data = f.read_bytes()
        if f.name == "weights.safetensors" and cut_weights:
            data = data[: len(data) // 2]
        if f.name == "weights.safetensors" and flip:
            data = data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:]
        (dest / f.name).write_bytes(data)


@pytest.fixture
def store(tmp_path) -> Path:
    """digits@1 and digits@2 from the shipped store (small bundles)."""
    root = tmp_path / "store"
    for v in ("1", "2"):
        shutil.copytree(SHIPPED / "adapters" / "digits" / v, root / "adapters" / "digits" / v)
    return root


def _resolve(repo: Repository, ref: str) -> str:
    return repo.resolve(AdapterRef.parse(ref))


# ------------------------------------------------------------------------ the repository alone
def test_policies_parse_and_refuse():
    assert parse_policies("latest 1") == (Policy(1), {})
    assert parse_policies("latest 2, cifar10=all") == (Policy(2), {"cifar10": Policy(None)})
    for bad in ("latest 0", "newest 1", "cifar10=latest", "Bad Name=all"):
        with pytest.raises(ValueError):
            parse_policies(bad)


def test_only_whole_versions_serve_and_latest_skips_the_rest(store):
    repo = Repository(ModelStore(store), "poll", "all")
    repo.scan()
    assert _resolve(repo, "digits") == "digits@2"
    d = store / "adapters" / "digits"
    _copy_version(d / "2", d / "3", manifest_only=True)  # the manifest lands first
    _copy_version(d / "2", d / "4", cut_weights=True)  # weights cut short
    _copy_version(d / "2", d / "5", flip=True)  # whole size, wrong sha256
    (d / "6").mkdir()  # no manifest yet
    shutil.copytree(d / "2", d / ".7.tmp")  # a dot-directory is never looked at
    added, removed = repo.scan()
    assert added == set() and removed == set()
    states = {s.version: s for s in repo.states("digits")}
    assert {v: s.state for v, s in states.items()} == {"1": AVAILABLE, "2": AVAILABLE, "3": INCOMPLETE, "4": INCOMPLETE, "5": INVALID, "6": INCOMPLETE}
    assert "0 of" not in states["4"].reason and "bytes" in states["4"].reason and "sha256" in states["5"].reason
    assert _resolve(repo, "digits") == "digits@2"  # the previous latest keeps answering
    with pytest.raises(DomainError) as e:
        _resolve(repo, "digits@5")
    assert e.value.kind is Kind.CONFLICT and e.value.code == "checksum_mismatch"
    with pytest.raises(DomainError) as e:
        _resolve(repo, "digits@3")
    assert e.value.kind is Kind.CONFLICT and e.value.code == "missing_file"
    # made whole: it becomes the latest at the next scan
    shutil.copy2(d / "2" / "weights.safetensors", d / "4" / "weights.safetensors")
    added, _ = repo.scan()
    assert added == {"digits@4"} and _resolve(repo, "digits") == "digits@4"
    # deleted: unlisted, the previous one answers, the deleted one is unknown
    shutil.rmtree(d / "4")
    _, removed = repo.scan()
    assert removed == {"digits@4"} and _resolve(repo, "digits") == "digits@2"
    assert "4" not in {s.version for s in repo.states("digits")}
    with pytest.raises(DomainError) as e:
        _resolve(repo, "digits@4")
    assert e.value.kind is Kind.NOT_FOUND and e.value.code == "unknown_adapter"


def test_a_version_is_hashed_once_until_its_files_change(store, monkeypatch):
    import service.repository as repository

    calls = []
    real = repository.verify_files
    monkeypatch.setattr(repository, "verify_files", lambda p, m: (calls.append(Path(p).name), real(p, m))[1])
    repo = Repository(ModelStore(store), "poll", "all")
    repo.scan()
    repo.scan()
    assert sorted(calls) == ["1", "2"]
    w = store / "adapters" / "digits" / "2" / "weights.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:])  # same size, new content and mtime
    repo.scan()
    assert sorted(calls) == ["1", "2", "2"] and {s.version: s.state for s in repo.states("digits")}["2"] == INVALID
    assert _resolve(repo, "digits") == "digits@1"


def test_version_policy_latest_n_retires_older_versions(store):
    repo = Repository(ModelStore(store), "poll", "latest 1")
    repo.scan()
    assert {s.version: s.state for s in repo.states("digits")} == {"1": RETIRED, "2": AVAILABLE}
    assert repo.available("digits") == ["2"]
    with pytest.raises(DomainError) as e:
        _resolve(repo, "digits@1")
    assert e.value.kind is Kind.NOT_FOUND and "version policy" in e.value.message
    assert Repository(ModelStore(store), "poll", "latest 1,digits=all").scan()[0] == {"digits@1", "digits@2"}


# ------------------------------------------------------------------------ a real server, poll mode
@pytest.fixture(scope="module")
def cat() -> str:
    from PIL import Image
    import skimage.data as sd

    buf = io.BytesIO()
    Image.fromarray(sd.chelsea()).save(buf, "JPEG", quality=90)
    return base64.b64encode(buf.getvalue()).decode()


def _predict(c: httpx.Client, cat: str) -> tuple[int, str]:
    r = c.post("/v1/predict", json={"adapter": "cifar10", "images": [cat], "top_k": 1})
    return r.status_code, (r.json()["results"][0]["version"] if r.status_code == 200 else r.text)


def _until(what, timeout_s: float = 10.0, every_s: float = 0.2):
    t0 = time.monotonic()
    while True:
        got = what()
        if got:
            return time.monotonic() - t0
        assert time.monotonic() - t0 < timeout_s, "not within the time"
        time.sleep(every_s)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_poll_mode_serves_only_whole_versions(tmp_path, cat):
    """The issue's scenario: a half-copied version and a complete one with a wrong sha256 never
    answer `cifar10`; made whole it answers within 10 s; deleted, the previous version answers
    within 10 s and no listing names it; the repository index is readable without a token."""
    root = tmp_path / "store"
    shutil.copytree(SHIPPED / "backbones", root / "backbones")
    shutil.copytree(SHIPPED / "adapters" / "cifar10" / "6", root / "adapters" / "cifar10" / "6")
    src = SHIPPED / "adapters" / "cifar10" / "1"  # another trained bundle, copied in as version 7
    d = root / "adapters" / "cifar10"
    with ServerProcess(root, tmp_path / "server.log", backend="torch", model_control_mode="poll", repository_poll_s=1, adapters="cifar10", admin_token=TOKEN,
                       gallery_dir=tmp_path / "galleries", warmup="false", version_policy="all") as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        assert _predict(c, cat) == (200, "6")
        _copy_version(src, d / "7", cut_weights=True)
        seen = []
        t_end = time.monotonic() + 4  # four polls: every answer is version 6, never an error
        while time.monotonic() < t_end:
            seen.append(_predict(c, cat))
        assert set(seen) == {(200, "6")}, seen
        info = c.get("/v1/adapters/cifar10").json()
        row = {v["version"]: v for v in info["versions"]}["7"]
        assert info["latest"] == "6" and row["state"] == "incomplete" and not row["loaded"] and row["error"]
        index = c.post("/v2/repository/index").json()
        assert {(m["version"], m["state"]) for m in index if m["name"] == "cifar10"} == {("6", "READY"), ("7", "UNAVAILABLE")}
        # the same files, whole but one byte wrong: still never served
        shutil.rmtree(d / "7")
        _copy_version(src, d / "7", flip=True)
        _until(lambda: {v["version"]: v["state"] for v in c.get("/v1/adapters/cifar10").json()["versions"]}.get("7") == "invalid")
        assert _predict(c, cat) == (200, "6")
        r = c.post("/v1/predict", json={"adapter": "cifar10@7", "images": [cat]})
        assert r.status_code == 409 and r.json()["error"]["code"] == "checksum_mismatch"
        # made whole: the new latest within 10 s
        shutil.copy2(src / "weights.safetensors", d / "7" / "weights.safetensors")
        took = _until(lambda: _predict(c, cat) == (200, "7"))
        print(f"whole version answering after {took:.1f} s")
        # deleted: the previous version answers within 10 s, no listing names the deleted one
        shutil.rmtree(d / "7")
        took = _until(lambda: _predict(c, cat) == (200, "6"))
        print(f"previous version answering {took:.1f} s after the delete")
        assert "7" not in c.get("/v1/adapters").json()["adapters"][0]["versions"]
        assert "7" not in {v["version"] for v in c.get("/v1/adapters/cifar10").json()["versions"]}
        _until(lambda: all(m["version"] != "7" for m in c.post("/v2/repository/index").json()))
        r = c.post("/v1/predict", json={"adapter": "cifar10@7", "images": [cat]})
        assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_adapter"
        assert "cifar10@7" not in c.get("/readyz").json()["loaded"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_explicit_and_none_modes(tmp_path, cat):
    """explicit: only load / unload change what serves (and a load sees a new version on disk);
    none: the store as it was at start."""
    root = tmp_path / "store"
    shutil.copytree(SHIPPED / "backbones", root / "backbones")
    for name, v in (("cifar10", "6"), ("digits", "2")):
        shutil.copytree(SHIPPED / "adapters" / name / v, root / "adapters" / name / v)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    common = dict(backend="torch", admin_token=TOKEN, warmup="false", repository_poll_s=1, grpc_port=0)
    with ServerProcess(root, tmp_path / "explicit.log", model_control_mode="explicit", adapters="cifar10", gallery_dir=tmp_path / "g1", **common) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as c:
        assert _predict(c, cat) == (200, "6")
        r = c.post("/v1/predict", json={"adapter": "digits", "images": [cat]})
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_loaded"
        assert c.post("/v2/repository/models/digits/load", headers=auth).status_code == 200
        assert c.post("/v1/predict", json={"adapter": "digits", "images": [cat]}).status_code == 200
        shutil.copytree(SHIPPED / "adapters" / "cifar10" / "1", root / "adapters" / "cifar10" / "7")
        time.sleep(2.5)  # no polling: still version 6
        assert _predict(c, cat) == (200, "6")
        assert c.post("/v2/repository/models/cifar10/load", headers=auth).status_code == 200  # a load looks again
        assert _predict(c, cat) == (200, "7")
        r = c.post("/v2/repository/models/digits/unload", headers=auth)
        assert r.status_code == 200, r.text
        r = c.post("/v1/predict", json={"adapter": "digits", "images": [cat]})
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_loaded"
    shutil.rmtree(root / "adapters" / "cifar10" / "7")
    with ServerProcess(root, tmp_path / "none.log", model_control_mode="none", adapters="cifar10", gallery_dir=tmp_path / "g2", **common) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as c:
        shutil.copytree(SHIPPED / "adapters" / "cifar10" / "1", root / "adapters" / "cifar10" / "7")
        time.sleep(2.5)
        assert _predict(c, cat) == (200, "6")
        assert json.loads(c.get("/v1/adapters/cifar10").text)["latest"] == "6"
