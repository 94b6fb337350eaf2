#!/usr/bin/env bash
# The Docker image's install steps, as a script the image runs and a test runs in a fresh venv.
#
#   scripts/docker-install.sh deps   # needs only pyproject.toml: torch (kept when the base image
#                                    # has it), every [project] dependency, the ONNX Runtime build
#   scripts/docker-install.sh app    # the package itself (editable, no deps), then a smoke check
#
# Two phases so the image caches the slow dependency layer until pyproject.toml changes.
# Settings (environment):
#   PYTHON            interpreter to install into (default: python3, else python)
#   ORT_PACKAGE       onnxruntime (CPU) or onnxruntime-gpu (CUDA images); default onnxruntime
#   TORCH_SPEC        what to install when torch is missing (default: torch and torchvision)
#   TORCH_INDEX_URL   index for TORCH_SPEC, e.g. https://download.pytorch.org/whl/cpu (default: pip's)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY="${PYTHON:-$(command -v python3 || command -v python)}"
ORT_PACKAGE="${ORT_PACKAGE:-onnxruntime}"
TORCH_SPEC="${TORCH_SPEC:-torch torchvision}"
TORCH_INDEX_URL="${TORCH_INDEX_URL:-}"
pip_install() { "$PY" -m pip install --no-cache-dir --disable-pip-version-check --progress-bar off "$@"; }

deps() {
  # torch first: a CUDA base image ships a matched torch/torchvision that must not be replaced.
  if "$PY" -c "import torch, torchvision" 2>/dev/null; then
    echo "docker-install: keeping torch $("$PY" -c 'import torch; print(torch.__version__)')" >&2
  else
    # shellcheck disable=SC2086  # TORCH_SPEC is a list of requirement words
    pip_install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} $TORCH_SPEC
  fi
  # Every [project] dependency except torch/torchvision (installed above) and onnxruntime
  # (ORT_PACKAGE below: onnxruntime and onnxruntime-gpu both own the `onnxruntime` module).
  mapfile -t reqs < <("$PY" - <<'EOF'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
skip = {"torch", "torchvision", "onnxruntime", "onnxruntime-gpu"}
for d in deps:
    if re.split(r"[\s<>=!~;\[]", d, maxsplit=1)[0].lower() not in skip:
        print(d)
EOF
  )
  # setuptools >= 70.1 builds wheels itself (the app step installs without build isolation).
  pip_install "setuptools>=70.1" "${reqs[@]}" "$ORT_PACKAGE"
}

app() {
  # Editable, so the package's default model store is ./model_store next to the code.
  pip_install --no-deps --no-build-isolation -e .
  "$PY" -m pip check || echo "docker-install: pip check reports the conflicts above" >&2
  "$PY" -c "import metalora, service, onnxruntime; from metalora.cli import app; print('docker-install: ok, onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers())"
}

case "${1:-}" in
  deps) deps ;;
  app) app ;;
  all) deps; app ;;
  *) echo "usage: $0 deps|app|all" >&2; exit 2 ;;
esac
