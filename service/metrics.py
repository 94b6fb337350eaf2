"""Every Prometheus metric of the service (DESIGN.md §6), in base units, with a bounded adapter label.

Each app owns its own `CollectorRegistry`, so several servers in one process (tests) never clash.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from metalora.refs import AdapterRef

# Request latency spans a cached 5 ms answer up to a CPU batch stuck behind a long queue.
REQUEST_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
QUEUE_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STAGE_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
BATCH_ADAPTER_BUCKETS = (1, 2, 3, 4, 6, 8, 16, 32)
LOAD_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# Label values known in advance: each series exists (at zero) from start-up, so an alert or a
# dashboard panel on it reads 0 on a healthy server, not "no data".
REJECT_REASONS = ("queue_full", "deadline", "cancelled", "body_too_large")
STAGES = ("decode", "forward", "prefix", "adapters", "knn")
TIERS = ("device", "pinned", "store")
UNCOUNTED = ("/metrics", "/healthz", "/readyz", "/v2/health/live", "/v2/health/ready")  # probes and scrapes would drown the request counts

OTHER = "other"
FANOUT = "fanout"  # the label of a request that names several adapters
disable_created_metrics()  # `_created` series double the scrape and no dashboard here reads them
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """The service's metrics on one registry, plus the rule that keeps the adapter label bounded."""

    def __init__(self, max_adapters: int = 32, allow: list[str] | None = None):
        self.registry = r = CollectorRegistry()
        self.max_adapters = max_adapters
        self._allowed: set[str] = set()
        for name in ["base", FANOUT, *(allow or [])]:
            self.admit(name)
        self.requests = Counter("metalora_requests", "HTTP requests answered", ["endpoint", "adapter", "code"], registry=r)
        self.request_duration = Histogram(
            "metalora_request_duration_seconds", "Time from request to response", ["endpoint", "adapter"], buckets=REQUEST_BUCKETS_S, registry=r
        )
        self.queue_wait = Histogram("metalora_queue_wait_seconds", "Time an image waits before its batch runs", buckets=QUEUE_BUCKETS_S, registry=r)
        self.batch_size = Histogram("metalora_batch_size", "Images per engine batch", buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.batch_adapters = Histogram("metalora_batch_adapters", "Distinct adapters per engine batch", buckets=BATCH_ADAPTER_BUCKETS, registry=r)
        self.inference = Histogram("metalora_inference_seconds", "Time per stage of the work", ["stage"], buckets=STAGE_BUCKETS_S, registry=r)
        self.queue_depth = Gauge("metalora_queue_depth", "Images accepted and not yet computed", registry=r)
        self.rejected = Counter("metalora_rejected", "Work refused or dropped by the batcher", ["reason"], registry=r)
        self.adapters_loaded = Gauge("metalora_adapters_loaded", "Adapters per tier (device, pinned, store)", ["tier"], registry=r)
        self.adapter_load = Histogram("metalora_adapter_load_seconds", "Time to verify and load a bundle onto the device", buckets=LOAD_BUCKETS_S, registry=r)
        self.gallery_items = Gauge("metalora_gallery_items", "Items in an adapter's k-NN gallery", ["adapter"], registry=r)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        for stage in STAGES:
            self.inference.labels(stage)
        for tier in TIERS:
            self.adapters_loaded.labels(tier)

    def init_endpoints(self, endpoints: list[str]) -> None:
        """Request series of each route template (adapter `none`, code 200) at zero from start-up."""
        for ep in endpoints:
            if ep not in UNCOUNTED:
                self.requests.labels(ep, "none", "200")
                self.request_duration.labels(ep, "none")

    def admit(self, name: str) -> None:
        """Give `name` its own label value while there is room (only names that resolved in the store)."""
        if len(self._allowed) < self.max_adapters + 2:  # +2: 'base' and 'fanout' are always there
            self._allowed.add(name)

    def label(self, name: str | None) -> str:
        """An adapter label value: its name when admitted, else 'other' (unknown names never get one)."""
        if not name:
            return "none"
        name, _ = AdapterRef.split(name)  # unvalidated here: a name the registry refused counts as "other"
        return name if name in self._allowed else OTHER

    def render(self) -> bytes:
        return generate_latest(self.registry)
