# MetaLoRA Serve: the service on the shipped model store.
#   GPU (default): docker build -t metalora-serve .
#   CPU:           docker build --build-arg VARIANT=cpu -t metalora-serve:cpu .
# Run: docker run --gpus all -p 8000:8000 metalora-serve   (mount your own store on /app/model_store)
ARG VARIANT=gpu

# Official PyTorch runtime image: Python 3.11, CUDA 12.4, cuDNN 9, torch + torchvision.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime AS base-gpu
ENV ORT_PACKAGE=onnxruntime-gpu

# CPU: slim Python 3.11 with torch from PyTorch's CPU wheel index (no CUDA libraries).
FROM python:3.11-slim-bookworm AS base-cpu
ENV ORT_PACKAGE=onnxruntime \
    TORCH_SPEC="torch==2.5.1 torchvision==0.20.1" \
    TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# The variant stage is picked by a build arg, which the linter cannot resolve to a tag.
# hadolint ignore=DL3006
FROM base-${VARIANT} AS runtime
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    METALORA_HOST=0.0.0.0 \
    METALORA_PORT=8000 \
    METALORA_GRPC_PORT=8001 \
    METALORA_STORE=/app/model_store
WORKDIR /app

# Dependencies before code: this layer is rebuilt only when pyproject.toml or the script change.
COPY pyproject.toml ./
COPY scripts/docker-install.sh scripts/
RUN bash scripts/docker-install.sh deps

COPY README.md ./
COPY metalora/ metalora/
COPY service/ service/
COPY clients/ clients/
COPY bench/ bench/
COPY metalora_serve/ metalora_serve/
RUN bash scripts/docker-install.sh app \
 && groupadd --gid 10001 metalora \
 && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin metalora

# The shipped store, owned by the service user so gallery edits can be written; mount a volume
# on /app/model_store to serve your own bundles instead.
COPY --chown=10001:10001 model_store/ model_store/
# Mount points for the compose/k8s volumes, owned by the service user before anything mounts them.
RUN install -d -o 10001 -g 10001 model_store/galleries /home/metalora/.cache /home/metalora/.cache/metalora

USER 10001:10001
EXPOSE 8000 8001
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('METALORA_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["metalora"]
CMD ["serve"]
