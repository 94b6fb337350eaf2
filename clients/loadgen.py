"""Load generator: closed loop (fixed concurrency) or open loop (fixed arrival rate) over httpx.

Bodies are encoded once before the clock starts, so the generator spends its CPU on sending,
not on base64. Requests are not retried: a 503 is counted as an error, that is the point.
The report (JSON) gives throughput, latency percentiles and errors by status.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field

import httpx
import numpy as np

from .client import encode_image

ENDPOINTS = ("predict", "embed", "knn")


@dataclass
class LoadSpec:
    """What to send and how hard; exactly one of `concurrency` / `rate`, and a bound."""

    url: str
    images: list[bytes]
    adapters: dict[str, float] = field(default_factory=lambda: {"base": 1.0})  # name -> weight
    endpoint: str = "predict"
    concurrency: int | None = 8  # closed loop: this many requests in flight at all times
    rate: float | None = None  # open loop: requests per second, arrivals independent of answers
    poisson: bool = False  # open loop: exponential inter-arrival times instead of a fixed period
    requests: int | None = None
    duration_s: float | None = 10.0
    images_per_request: int = 1
    top_k: int = 5
    k: int = 10
    timeout_s: float = 60.0
    seed: int = 0
    warmup_requests: int = 0  # sent and awaited before the clock starts, not counted

    def __post_init__(self):
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {ENDPOINTS}")
        if (self.concurrency is None) == (self.rate is None):
            raise ValueError("give exactly one of concurrency (closed loop) or rate (open loop)")
        if self.requests is None and self.duration_s is None:
            raise ValueError("give a bound: requests or duration_s")
        if not self.images:
            raise ValueError("no images to send")
        if not self.adapters or min(self.adapters.values()) < 0 or sum(self.adapters.values()) <= 0:
            raise ValueError("adapter weights must be non-negative with a positive sum")


def parse_mix(items: list[str]) -> dict[str, float]:
    """`["cifar10:3", "mnist"]` -> {"cifar10": 3.0, "mnist": 1.0}."""
    out: dict[str, float] = {}
    for it in items:
        name, _, w = it.partition(":")
        out[name] = out.get(name, 0.0) + (float(w) if w else 1.0)
    return out


def _percentiles(lat: list[float]) -> dict:
    if not lat:
        return {"p50": None, "p90": None, "p99": None, "mean": None, "max": None}
    a = np.asarray(lat)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(a.mean()), "max": float(a.max())}


class _Bodies:
    """Pre-encoded JSON bodies: one per (adapter, image group), picked at random per request."""

    def __init__(self, spec: LoadSpec):
        b64 = [encode_image(i) for i in spec.images]
        n = spec.images_per_request
        groups = [[b64[(j + i) % len(b64)] for i in range(n)] for j in range(len(b64))]
        extra = {"predict": {"top_k": spec.top_k}, "knn": {"k": spec.k}}.get(spec.endpoint, {})
        self.bodies = {
            a: [json.dumps({"adapter": a, "images": g, **extra}).encode() for g in groups] for a in spec.adapters
        }
        self.names = list(spec.adapters)
        self.weights = [spec.adapters[a] for a in self.names]
        self.rng = random.Random(spec.seed)

    def pick(self) -> tuple[str, bytes]:
        a = self.rng.choices(self.names, self.weights)[0]
        return a, self.rng.choice(self.bodies[a])


async def run_load(spec: LoadSpec, progress=None) -> dict:
    """Run one load test and return its report."""
    bodies = _Bodies(spec)
    path = f"/v1/{spec.endpoint}"
    in_flight = spec.concurrency or 1024
    limits = httpx.Limits(max_connections=in_flight, max_keepalive_connections=in_flight)
    lat: list[float] = []
    by_adapter: dict[str, list[float]] = {a: [] for a in spec.adapters}
    errors: dict[str, int] = {}
    sent = 0

    async with httpx.AsyncClient(base_url=spec.url, timeout=spec.timeout_s, limits=limits) as http:

        async def one(adapter: str, body: bytes, record: bool = True) -> None:
            t = time.perf_counter()
            try:
                r = await http.post(path, content=body, headers={"content-type": "application/json"})
                status = str(r.status_code)
                ok = r.status_code == 200
            except httpx.TimeoutException:
                status, ok = "timeout", False
            except httpx.TransportError:
                status, ok = "transport", False
            if not record:
                return
            dt = time.perf_counter() - t
            if ok:
                lat.append(dt)
                by_adapter[adapter].append(dt)
            else:
                errors[status] = errors.get(status, 0) + 1
            if progress is not None:
                progress.update(1)

        for _ in range(spec.warmup_requests):
            await one(*bodies.pick(), record=False)

        t0 = time.perf_counter()
        deadline = t0 + spec.duration_s if spec.duration_s is not None else float("inf")
        limit = spec.requests if spec.requests is not None else float("inf")

        def more() -> bool:
            return sent < limit and time.perf_counter() < deadline

        if spec.concurrency is not None:

            async def worker() -> None:
                nonlocal sent
                while more():
                    sent += 1
                    await one(*bodies.pick())

            await asyncio.gather(*(worker() for _ in range(spec.concurrency)))
        else:
            rng = random.Random(spec.seed + 1)
            tasks = []
            next_t = t0
            while more():
                now = time.perf_counter()
                if next_t > now:
                    await asyncio.sleep(next_t - now)
                    if not more():
                        break
                sent += 1
                tasks.append(asyncio.create_task(one(*bodies.pick())))
                next_t += rng.expovariate(spec.rate) if spec.poisson else 1.0 / spec.rate
            await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - t0

    done = len(lat)
    report = {
        "mode": "closed" if spec.concurrency is not None else "open",
        "endpoint": spec.endpoint,
        "concurrency": spec.concurrency,
        "rate_rps": spec.rate,
        "images_per_request": spec.images_per_request,
        "adapters": spec.adapters,
        "sent": sent,
        "ok": done,
        "errors": dict(sorted(errors.items())),
        "error_rate": (sent - done) / sent if sent else 0.0,
        "duration_s": elapsed,
        "throughput_rps": done / elapsed if elapsed else 0.0,
        "images_per_s": done * spec.images_per_request / elapsed if elapsed else 0.0,
        "latency_s": _percentiles(lat),
        "latency_by_adapter_s": {a: _percentiles(v) for a, v in by_adapter.items()},
    }
    return report


def run_load_sync(spec: LoadSpec, progress=None) -> dict:
    return asyncio.run(run_load(spec, progress))


def spec_dict(spec: LoadSpec) -> dict:
    d = asdict(spec)
    d["images"] = len(spec.images)
    return d
