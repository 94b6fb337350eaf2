"""The micro-batcher: a bounded queue of images, batches by size or delay, deadlines enforced.

One asyncio task pulls items off the queue, waits up to `max_delay_s` for a batch to fill, drops
items whose deadline has passed (504, never computed) and hands the rest to the engine, which
runs them on its own thread. Every item's future is resolved or failed exactly once, and every
item's `release` runs exactly once when it leaves, so the adapter registry knows what is in flight.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import torch

from .errors import DomainError, Kind, unavailable
from .metrics import Metrics

log = logging.getLogger("metalora.service")


@dataclass(eq=False)
class WorkItem:
    """One image for one adapter: the unit the batcher queues and the engine computes."""

    x: torch.Tensor  # (3, S, S), preprocessed
    key: str  # loaded adapter key: 'base' or 'name@version'
    deadline: float  # time.monotonic() after which it is not computed
    release: Callable[[], None] = lambda: None  # called once when the item leaves the system
    future: asyncio.Future = field(default=None)  # resolved with the engine's result for this item
    enqueued: float = 0.0
    started: bool = False  # handed to the engine
    dropped: bool = False  # given up by its request (deadline or client gone) and already counted


RunBatch = Callable[[list[WorkItem]], Awaitable[list[Any]]]


class Batcher:
    """Collects WorkItems into batches of at most `max_batch_size`, waiting at most `max_delay_s`."""

    def __init__(self, run_batch: RunBatch, metrics: Metrics, *, max_batch_size: int, max_delay_s: float, max_queue: int, retry_after_s: int = 1):
        self.run_batch = run_batch
        self.metrics = metrics
        self.max_batch_size, self.max_delay_s, self.max_queue = max_batch_size, max_delay_s, max_queue
        self.retry_after_s = retry_after_s
        self.queue: asyncio.Queue[WorkItem] = asyncio.Queue()
        self.pending = 0  # accepted, not yet handed to the engine (queued or in the batch being formed)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="metalora-batcher")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        while not self.queue.empty():
            self._fail(self.queue.get_nowait(), unavailable("shutting_down", "the server is shutting down", self.retry_after_s))

    def submit(self, items: list[WorkItem]) -> list[asyncio.Future]:
        """Accept all items or none: a request that does not fit the queue gets 503 + Retry-After."""
        if self.pending + len(items) > self.max_queue:
            self.metrics.rejected.labels("queue_full").inc(len(items))
            raise unavailable("overloaded", f"queue is full ({self.pending} of {self.max_queue} images waiting); retry later", self.retry_after_s)
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        for it in items:
            it.future, it.enqueued = loop.create_future(), now
            self.queue.put_nowait(it)
        self.pending += len(items)
        self.metrics.queue_depth.set(self.pending)
        return [it.future for it in items]

    def drop(self, items: list[WorkItem], reason: str) -> None:
        """Its request gave up: items not yet handed to the engine are never computed (counted under `reason`)."""
        n = 0
        for it in items:
            if not it.started and not it.future.done():
                it.dropped = True
                it.future.cancel()
                n += 1
        if n:
            self.metrics.rejected.labels(reason).inc(n)

    async def _collect(self) -> list[WorkItem]:
        batch = [await self.queue.get()]
        until = time.monotonic() + self.max_delay_s
        while len(batch) < self.max_batch_size:
            if not self.queue.empty():
                batch.append(self.queue.get_nowait())
                continue
            left = until - time.monotonic()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), left))
            except asyncio.TimeoutError:
                break
        self.pending -= len(batch)
        self.metrics.queue_depth.set(self.pending)
        return batch

    async def _loop(self) -> None:
        while True:
            batch = await self._collect()
            now = time.monotonic()
            live = []
            for it in batch:
                if it.future.done():  # its request gave up on it: nothing to compute
                    if not it.dropped:
                        self.metrics.rejected.labels("cancelled").inc()
                    self._fail(it, None)
                elif now > it.deadline:
                    self.metrics.rejected.labels("deadline").inc()
                    self._fail(it, DomainError(Kind.DEADLINE_EXCEEDED, "deadline_exceeded", f"request waited {now - it.enqueued:.3f} s in the queue, past its deadline; it was not computed"))
                else:
                    live.append(it)
            if not live:
                continue
            for it in live:
                it.started = True
                self.metrics.queue_wait.observe(now - it.enqueued)
            try:
                results = await self.run_batch(live)
                if len(results) != len(live):
                    raise RuntimeError(f"engine returned {len(results)} results for a batch of {len(live)}")
            except asyncio.CancelledError:
                for it in live:
                    self._fail(it, DomainError(Kind.UNAVAILABLE, "shutting_down", "the server is shutting down"))
                raise
            except Exception as e:  # a failed batch fails its items, never the loop
                log.exception("engine batch of %d failed", len(live))
                for it in live:
                    self._fail(it, e)
                continue
            for it, res in zip(live, results):
                if hasattr(res, "queue_s"):
                    res.queue_s = now - it.enqueued
                if not it.future.done():
                    it.future.set_result(res)
                it.release()

    @staticmethod
    def _fail(it: WorkItem, exc: BaseException | None) -> None:
        if exc is not None and not it.future.done():
            it.future.set_exception(exc)
        it.release()
