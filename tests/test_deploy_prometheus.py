"""A real Prometheus server (Debian's `prometheus`, installed by .ci/run) scrapes a real
`metalora serve` on loopback with the shipped deploy/prometheus/prometheus.yml; metalora_
metrics are read back through Prometheus's HTTP query API, and every PromQL expression of the
Grafana dashboard is run against it.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = shutil.which("prometheus")
pytestmark = [
    pytest.mark.skipif(PROMETHEUS is None, reason="the `prometheus` binary is absent (Debian package prometheus; .ci/run installs it)"),
    pytest.mark.slow,
]
REQUESTS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(fn, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: process exited with {proc.returncode}\n{log.read_text()[-3000:] if log else ''}")
        try:
            v = fn()
            if v:
                return v
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}\n{log.read_text()[-3000:] if log else ''}")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """`metalora serve` on the shipped backbone (base only, a temporary store) on a free port."""
    tmp = tmp_path_factory.mktemp("svc")
    shutil.copytree(ROOT / "model_store" / "backbones", tmp / "store" / "backbones")
    port = _free_port()
    log = tmp / "serve.log"
    env = {**os.environ, "METALORA_STORE": str(tmp / "store"), "METALORA_BACKEND": "torch", "METALORA_ONNX_CACHE": str(tmp / "onnx"), "METALORA_GRPC_PORT": "0"}  # no gRPC: 8001 may be taken
    env.pop("METALORA_ADMIN_TOKEN", None)
    cli = Path(sys.executable).parent / "metalora"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(cli), "serve", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"], env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: httpx.get(f"{url}/readyz", timeout=2).status_code == 200, 240, "the service to turn ready", proc, log)
        yield url
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def prometheus(service, tmp_path_factory):
    """Prometheus with the shipped config, its target rewritten from `metalora:8000` to the test server."""
    tmp = tmp_path_factory.mktemp("prom")
    cfg = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "metalora")
    job["static_configs"] = [{"targets": [service.removeprefix("http://")]}]
    cfg["global"]["scrape_interval"] = cfg["global"]["evaluation_interval"] = "1s"
    cfg["rule_files"] = [str(ROOT / "deploy/prometheus" / f) for f in cfg["rule_files"]]
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    port = _free_port()
    log = tmp / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=out, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: httpx.get(f"{url}/-/ready", timeout=2).status_code == 200, 60, "Prometheus to start", proc, log)
        yield url
    finally:
        _stop(proc)


def _query(prom: str, q: str) -> list[dict]:
    r = httpx.get(f"{prom}/api/v1/query", params={"query": q}, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", f"{q}: {body}"
    return body["data"]["result"]


def _jpeg() -> str:
    from PIL import Image
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buf, "JPEG")
    return base64.b64encode(buf.getvalue()).decode()


def test_prometheus_reads_back_metalora_metrics(service, prometheus):
    img = _jpeg()
    for _ in range(REQUESTS):
        r = httpx.post(f"{service}/v1/predict", json={"adapter": "base", "images": [img], "top_k": 1}, timeout=120)
        assert r.status_code == 200, r.text
    q = 'sum(metalora_requests_total{endpoint="/v1/predict",adapter="base",code="200"})'
    # Prometheus must scrape at least once after the last request before the counter shows all of them.
    res = _wait(lambda: (v := _query(prometheus, q)) and float(v[0]["value"][1]) >= REQUESTS and v, 60, "the counter in Prometheus")
    assert float(res[0]["value"][1]) == REQUESTS
    up = _query(prometheus, 'up{job="metalora"}')
    assert up and up[0]["value"][1] == "1"
    batches = _query(prometheus, "sum(metalora_batch_size_count)")
    assert batches and float(batches[0]["value"][1]) >= 1


def test_dashboard_queries_run_against_real_metrics(service, prometheus):
    """Every Grafana panel's PromQL parses in Prometheus, and names only metrics the service exports."""
    exposed = httpx.get(f"{service}/metrics", timeout=10).text
    families = set(re.findall(r"^# TYPE (metalora_\w+) ", exposed, re.M))
    dash = json.loads((ROOT / "deploy/grafana/dashboards/metalora.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert exprs
    for e in exprs:
        _query(prometheus, e.replace("$__rate_interval", "1m"))  # raises on a parse error
        for name in set(re.findall(r"\bmetalora_\w+", e)):
            # A counter's TYPE line carries `_total`; a histogram's series add _bucket/_sum/_count.
            assert {name, re.sub(r"(_bucket|_sum|_count)$", "", name)} & families, f"dashboard uses {name}, the service exports no such metric"
    alerts = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    for rule in (r for g in alerts["groups"] for r in g["rules"]):
        for name in set(re.findall(r"\bmetalora_\w+", rule["expr"])):
            assert {name, re.sub(r"(_bucket|_sum|_count)$", "", name)} & families, f"alert {rule['alert']} uses {name}, not exported"
    hpa = yaml.safe_load((ROOT / "deploy/k8s/base/hpa.yaml").read_text())
    for m in hpa["spec"]["metrics"]:
        if m["type"] == "Pods":
            assert m["pods"]["metric"]["name"] in families


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) is absent")
def test_promtool_accepts_the_shipped_config():
    r = subprocess.run([shutil.which("promtool"), "check", "config", str(ROOT / "deploy/prometheus/prometheus.yml")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout + r.stderr


def test_alert_rules_load_and_evaluate(service, prometheus):
    """Prometheus loads deploy/prometheus/alerts.yml and evaluates every rule without error;
    with the service up and idle, none fires."""
    want = {r["alert"] for g in yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())["groups"] for r in g["rules"]}

    def evaluated():
        groups = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return rules if rules and all(r.get("lastEvaluation", "").startswith("20") for r in rules) else None

    rules = _wait(evaluated, 30, "the alert rules to be evaluated")
    assert {r["name"] for r in rules} == want
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    assert all(r["state"] == "inactive" for r in rules), [(r["name"], r["state"]) for r in rules]
