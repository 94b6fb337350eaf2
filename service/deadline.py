"""A request's deadline and cancellation, in no protocol's terms.

A front door builds one `Deadline` per request: when the request arrived (the HTTP middleware
stamps it; gRPC counts from the call), the time it may take (the server's `request_timeout_s`,
or less when the client asks for less), and, where the protocol can tell, a coroutine that
returns when the client has gone away. The core waits on its work through it and raises instead
of answering late: DEADLINE_EXCEEDED `deadline_exceeded` when the deadline passes first,
CANCELLED `client_closed_request` when the client hangs up first.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from .errors import DomainError, Kind


class Deadline:
    """One request's deadline (`time.monotonic()` seconds) and its client's presence."""

    def __init__(self, timeout_s: float, arrived: float | None = None, gone: Callable[[], Awaitable[None]] | None = None):
        self.timeout_s = timeout_s
        self.deadline = (time.monotonic() if arrived is None else arrived) + timeout_s
        self._gone = gone  # returns when the client disconnects; None: the protocol cannot tell

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def expired(self, what: str) -> DomainError:
        return DomainError(Kind.DEADLINE_EXCEEDED, "deadline_exceeded", f"the request's deadline ({self.timeout_s * 1000:.0f} ms from its arrival) passed {what}; it was not answered")

    async def _listen(self) -> None:
        if self._gone is None:
            await asyncio.get_running_loop().create_future()  # never done: no disconnect to see
        await self._gone()

    async def wait(self, futures: list[asyncio.Future], stage: str) -> list:
        """Results of `futures` in order (exceptions re-raised), or the deadline / cancellation error.
        The caller drops the work that has not started."""
        gone = asyncio.get_running_loop().create_task(self._listen())
        try:
            pending = set(futures)
            while pending:
                left = self.left()
                if left <= 0:
                    _abandon(futures)
                    raise self.expired(f"during {stage}")
                done, pending = await asyncio.wait(pending | {gone}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                if gone in done:
                    _abandon(futures)
                    raise DomainError(Kind.CANCELLED, "client_closed_request", "the client closed the connection before the answer")
                pending.discard(gone)
        finally:
            gone.cancel()
        return [f.result() for f in futures]  # raises the first failure, in order


def _abandon(futures: list[asyncio.Future]) -> None:
    """Nobody reads these any more: no "exception was never retrieved" log when they fail later."""
    for f in futures:
        f.add_done_callback(lambda f: f.cancelled() or f.exception())
