"""Calibration and abstention of a bundle: a head temperature and a k-NN "unknown" threshold.

Both are fitted on held-out *training* images (never the test set) and stored in the bundle's
manifest under `calibration`:

- **temperature** T (Guo, Pleiss, Sun & Weinberger, "On Calibration of Modern Neural Networks",
  ICML 2017): the head's probabilities become softmax(logits / T), T > 0 chosen to minimise the
  negative log-likelihood of the held-out labels. The ranking of labels never changes.
- **expected calibration error** (same paper, eq. 3): 15 equal-width confidence bins,
  ECE = sum_b |B_b|/n * |acc(B_b) - conf(B_b)|, confidence = the top-1 probability.
- **knn_threshold**: the score is the cosine similarity of the nearest gallery item (the first
  neighbour of `/v1/knn`); a result whose score is below the threshold is "unknown". The threshold
  is the `false_reject_rate` quantile of the held-out images' scores, so that fraction of the
  task's own (held-out) images is rejected by construction.
"""

from __future__ import annotations

import numpy as np
import torch

ECE_BINS = 15
DEFAULT_FALSE_REJECT = 0.05


def ece(probs: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error of probabilities (N, C) against labels (N,), in [0, 1]."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y)
    conf = p.max(1)
    correct = (p.argmax(1) == y).astype(np.float64)
    # Bins (lo, hi]; the first one also takes conf == 0.
    idx = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        m = idx == b
        if m.any():
            total += m.sum() / len(y) * abs(correct[m].mean() - conf[m].mean())
    return float(total)


def softmax_t(logits: np.ndarray | torch.Tensor, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / T) over the last axis, float64."""
    from scipy.special import softmax

    return softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=-1)


def fit_temperature(logits: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> float:
    """The T > 0 minimising the mean NLL of softmax(logits / T) on (logits (N, C), y (N,)).

    One-dimensional and convex in 1/T, so a bounded scalar search over log T (T in [0.05, 20])
    finds it; scipy's `minimize_scalar`.
    """
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax

    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y)
    rows = np.arange(len(y))

    def nll(log_t: float) -> float:
        return float(-log_softmax(z / np.exp(log_t), axis=1)[rows, y].mean())

    res = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(res.x))


def knn_threshold(nearest_sims: np.ndarray | torch.Tensor, false_reject_rate: float = DEFAULT_FALSE_REJECT) -> float:
    """The similarity below which a result is "unknown": the `false_reject_rate` quantile of the
    held-out images' nearest-gallery similarities (numpy's default linear interpolation)."""
    if not 0.0 <= false_reject_rate < 1.0:
        raise ValueError(f"false_reject_rate must be in [0, 1), got {false_reject_rate}")
    return float(np.quantile(np.asarray(nearest_sims, dtype=np.float64), false_reject_rate))


def nearest_similarity(gallery_emb: torch.Tensor, query: torch.Tensor) -> np.ndarray:
    """Cosine similarity (Q,) of each L2-normalised query (Q, D) to its nearest gallery item (N, D)."""
    import faiss

    g = np.ascontiguousarray(gallery_emb.float().numpy())
    q = np.ascontiguousarray(query.float().numpy())
    index = faiss.IndexFlatIP(g.shape[1])
    index.add(g)
    sims, _ = index.search(q, 1)  # (Q, 1)
    return sims[:, 0]


def unknown_rate(nearest_sims: np.ndarray, threshold: float) -> float:
    """Fraction of results below the threshold (the service answers them `"unknown": true`)."""
    s = np.asarray(nearest_sims)
    return float((s < threshold).mean()) if len(s) else 0.0
