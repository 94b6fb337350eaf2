"""Client-side exceptions; an HTTP error keeps the server's stable `code`, its status and message."""

from __future__ import annotations


class MetaLoRAError(Exception):
    """Anything the client could not do."""


class TransportError(MetaLoRAError):
    """No HTTP answer at all (connection refused, reset, timed out)."""


class APIError(MetaLoRAError):
    """The server answered with an error body `{"error": {"code", "message"}}`."""

    def __init__(self, status: int, code: str, message: str, body: dict | None = None, retry_after: float | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message
        self.body = body or {}
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        return self.status == 503


class OverloadedError(APIError):
    """503 (queue full, not ready, shutting down) after the client's retries ran out."""


class DeadlineError(APIError):
    """504: the request's deadline passed before the server computed it."""


def error_from_response(status: int, body, text: str, retry_after: float | None) -> APIError:
    """Build the exception for a non-2xx answer; tolerate bodies that are not the service's shape."""
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict) and "code" in err:
        code, message = str(err["code"]), str(err.get("message", ""))
    else:
        code, message = f"http_{status}", text[:500]
    cls = OverloadedError if status == 503 else DeadlineError if status == 504 else APIError
    return cls(status, code, message, body if isinstance(body, dict) else None, retry_after)
