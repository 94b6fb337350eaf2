"""The MetaLoRA inference service: FastAPI + cross-adapter micro-batching over `metalora.Runtime`."""
