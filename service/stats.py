"""Per adapter version inference statistics: counts and durations, as Triton's statistics
extension reports them (`GET /v2/models/{m}/stats`, gRPC `ModelStatistics`; Triton docs,
protocol/extension_statistics.md), for requests from every front door.

Durations are cumulative nanoseconds. `success` and `fail` time whole requests of the data
plane's `infer` (decode, queue and compute); `queue` is each image's wait in the batcher's queue,
`compute_infer` its share of its batch's forward.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float, n: int = 1) -> None:
        self.count += n
        self.ns += int(seconds * 1e9)


@dataclass
class ModelStats:
    """One adapter version's statistics since the server started (or since it was first asked for)."""

    last_inference_ms: int = 0  # wall-clock time of the last request, ms since the epoch
    inference_count: int = 0  # images answered
    execution_count: int = 0  # requests answered
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)


class Statistics:
    """Statistics by key (`base`, `name@version`); thread-safe, cheap enough for every request."""

    def __init__(self):
        self._lock = threading.Lock()
        self.models: dict[str, ModelStats] = {}

    def success(self, key: str, seconds: float, items: int, queue_s: float, compute_s: float) -> None:
        with self._lock:
            st = self.models.setdefault(key, ModelStats())
            st.success.add(seconds)
            st.queue.add(queue_s, items)
            st.compute_infer.add(compute_s, items)
            st.inference_count += items
            st.execution_count += 1
            st.last_inference_ms = int(time.time() * 1000)

    def failure(self, key: str, seconds: float) -> None:
        with self._lock:
            self.models.setdefault(key, ModelStats()).fail.add(seconds)

    def get(self, key: str) -> ModelStats:
        with self._lock:
            st = self.models.get(key) or ModelStats()
            return ModelStats(st.last_inference_ms, st.inference_count, st.execution_count, Duration(**vars(st.success)), Duration(**vars(st.fail)),
                              Duration(**vars(st.queue)), Duration(**vars(st.compute_infer)))
