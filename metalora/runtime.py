"""In-process inference over a model store: the backbone, loaded adapters, preprocessing.

The CLI uses it directly; the service wraps it with batching, caching and HTTP.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .adapters import MetaLoRAModel, Output
from .backbones import Preprocess, create_backbone
from .bundle import BundleError, load_bundle, load_gallery
from .images import DEFAULT_MAX_PIXELS, Preprocessor
from .imagenet import imagenet_labels
from .refs import BASE, AdapterRef, name_of, version_of
from .store import DEFAULT_STORE, ModelStore



def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
    return torch.device(device)


class Runtime:
    """One frozen backbone from the store's manifest + the adapters loaded onto it."""

    def __init__(self, store: str | Path | None = None, device: str | torch.device = "cpu", backbone: str | None = None):
        self.store = ModelStore(store or DEFAULT_STORE)
        self.device = torch.device(device) if not isinstance(device, torch.device) else device
        names = [p.name for p in (self.store.root / "backbones").iterdir() if p.is_dir()] if (self.store.root / "backbones").is_dir() else []
        name = backbone or (names[0] if len(names) == 1 else "efficientnet_lite0")
        bm = self.store.backbone_manifest(name) or {}
        self.backbone = create_backbone(name, **bm.get("kwargs", {}))
        want = bm.get("weights", {}).get("sha256")
        if want and want != self.backbone.identity.weights_sha256:
            raise BundleError("backbone_mismatch", f"store says {name} weights sha256 {want[:12]}…, loaded {str(self.backbone.identity.weights_sha256)[:12]}…")
        # What the manifest states about the cut must be what its kwargs build (e.g. after editing "split").
        stated = {"seed_in_dim": bm.get("seed_in_dim"), "targetable": bm.get("targetable")}
        built = {"seed_in_dim": self.backbone.seed_in_dim, "targetable": sorted(self.backbone.targetable())}
        wrong = [f"{key} {val} (they build {built[key]})" for key, val in stated.items()
                 if val is not None and (sorted(val) if key == "targetable" else val) != built[key]]
        if wrong:
            raise BundleError("backbone_mismatch", f"the store's {name} manifest says {' and '.join(wrong)}, which its kwargs "
                                                   f"{bm.get('kwargs', {})} contradict: set them to what the kwargs build")
        # One resolution per backbone in the store: the manifest may override the weights' default.
        self.preprocess_cfg = Preprocess(**{**self.backbone.preprocess.to_dict(), **bm.get("preprocess", {})})
        self.preprocessor = Preprocessor(self.preprocess_cfg)
        self.backbone.to(self.device).to(memory_format=torch.channels_last)
        self.model = MetaLoRAModel(self.backbone)
        self.manifests: dict[str, dict] = {}  # "name@version" -> manifest
        self.base_labels = imagenet_labels()

    # ------------------------------------------------------------------ adapters
    def resolve(self, ref: str) -> str:
        """`base`, `name` or `name@version` -> a loaded-adapter key (`base` or `name@version`)."""
        if ref == BASE:
            return BASE
        name, version, _ = self.store.resolve(ref)
        return AdapterRef.key_of(name, version)

    def load(self, ref: str) -> str:
        key = self.resolve(ref)
        if key == BASE or key in self.model.adapters:
            return key
        name, version, path = self.store.resolve(key)
        adapter, manifest = load_bundle(path, self.backbone, self.device)
        self.model.add_adapter(key, adapter)
        self.manifests[key] = manifest
        return key

    def unload(self, key: str) -> bool:
        self.manifests.pop(key, None)
        return self.model.remove_adapter(key) is not None

    def labels(self, key: str) -> list[str]:
        return self.base_labels if key == BASE else self.manifests[key]["adapter"]["labels"]

    def gallery(self, key: str):
        name, version, path = self.store.resolve(key)
        return load_gallery(path, self.manifests[key])

    # ------------------------------------------------------------------ compute
    def preprocess(self, images: list[bytes], max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
        return torch.stack([self.preprocessor(b, max_pixels) for b in images])  # (N, 3, S, S)

    @torch.inference_mode()
    def run(self, x: torch.Tensor, keys: list[str]) -> Output:
        """A mixed batch (N, 3, S, S), one loaded key per sample (`base` = the bare backbone).

        On CPU, `Output.stages` holds the seconds of the shared frozen prefix ('prefix') and of the
        adapted rest ('adapters'); on CUDA it is empty (the kernels are asynchronous, and the split
        would need a synchronisation that costs more than it tells).
        """
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        adapters = self.model._resolve([None if k == BASE else k for k in keys])
        if self.device.type != "cpu":
            return self.model.forward_from_prefix(self.model.forward_prefix(x), adapters)
        t0 = time.perf_counter()
        h = self.model.forward_prefix(x)  # (N, C, H, W): once for the whole batch, whatever the adapters
        t1 = time.perf_counter()
        out = self.model.forward_from_prefix(h, adapters)
        out.stages.update(prefix=t1 - t0, adapters=time.perf_counter() - t1)
        return out

    def calibration(self, key: str) -> dict:
        """The loaded bundle's `calibration` (metalora.calibration): `temperature`, `knn_threshold`; {} for base or none."""
        return {} if key == BASE else (self.manifests[key].get("calibration") or {})

    def format_predictions(self, key: str, logits: torch.Tensor, top_k: int) -> dict:
        """Top-k of softmax(logits / T) with the bundle's calibrated temperature T (1 without one),
        as the service's `/v1/predict` scores them."""
        temperature = float(self.calibration(key).get("temperature") or 1.0)
        probs = (logits.float() / temperature).softmax(-1)
        k = min(top_k, probs.numel())
        scores, idx = probs.topk(k)
        labels = self.labels(key)
        version = version_of(key)
        return {
            "adapter": name_of(key),
            "version": version,
            "predictions": [{"label": labels[i], "index": int(i), "score": float(s)} for s, i in zip(scores.tolist(), idx.tolist())],
        }

    def nearest_similarity(self, key: str, embeddings: torch.Tensor) -> np.ndarray | None:
        """Cosine similarity (N,) of each embedding (N, D) to its nearest item of the bundle's own
        gallery (`metalora.calibration.nearest_similarity`); None without a gallery or for base.
        Items added to a running server's gallery are not in the bundle, so are not seen here."""
        from .calibration import nearest_similarity

        gallery = None if key == BASE else self.gallery(key)
        if gallery is None or not len(gallery.ids):
            return None
        g = F.normalize(gallery.embeddings.float(), dim=-1)  # stored fp16; the service normalises them in fp32 too
        return nearest_similarity(g, F.normalize(embeddings.float(), dim=-1))

    def predict(self, images: list[bytes], ref: str, top_k: int = 5) -> list[dict]:
        """One result per image: `adapter`, `version`, `predictions` (calibrated scores), and, where
        the bundle has a k-NN threshold and a gallery, `unknown`: the nearest gallery item's cosine
        similarity is below `calibration.knn_threshold` (the service's rule). Raises BundleError for
        an unknown or bad adapter, metalora.images.ImageError for bytes that are not a usable image."""
        key = self.load(ref)
        out = self.run(self.preprocess(images), [key] * len(images))
        results = [self.format_predictions(key, lo, top_k) for lo in out.logits]
        threshold = self.calibration(key).get("knn_threshold")
        if threshold is not None:
            sims = self.nearest_similarity(key, out.embeddings)
            if sims is not None:
                for r, s in zip(results, sims.tolist()):
                    r["unknown"] = bool(s < threshold)
        return results

    def embed(self, images: list[bytes], ref: str) -> torch.Tensor:
        key = self.load(ref)
        return F.normalize(self.run(self.preprocess(images), [key] * len(images)).embeddings.float(), dim=-1)
