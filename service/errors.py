"""Domain errors: what went wrong with a request, in no protocol's terms.

Every failure the core reports is a `DomainError`: a stable machine-readable `code`
(`unknown_adapter`, `overloaded`, `deadline_exceeded`, ...), a message for people, optional
`details`, and its `kind` — the family of failure (the client's input is invalid, something named
does not exist, the server is overloaded, ...) that each front door maps to its protocol's status
through one table (`service/http/errors.py` for `/v1` and `/v2` REST, `service/grpc/server.py`
for gRPC). No HTTP status appears below the front doors. The kinds follow gRPC's canonical codes
and kserve's error classes (`kserve/errors.py`), which both protocols' statuses are drawn from.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from enum import Enum
from pathlib import Path

from metalora.bundle import BundleError
from metalora.images import ImageError
from metalora.refs import RefError


class Kind(str, Enum):
    """The family of a failure; a front door's table turns it into a status."""

    INVALID = "invalid"  # the request is malformed or a value is out of range
    UNSUPPORTED = "unsupported"  # a media type or format the server does not read
    TOO_LARGE = "too_large"  # over a limit: images, pixels, bytes, items
    UNAUTHENTICATED = "unauthenticated"  # no or a wrong admin token
    PERMISSION_DENIED = "permission_denied"  # the operation is switched off here
    NOT_FOUND = "not_found"  # an adapter, version or item that does not exist
    CONFLICT = "conflict"  # the store's state conflicts with the request (a bad bundle, an empty gallery)
    UNAVAILABLE = "unavailable"  # overloaded, starting, shutting down, a store down: retry later
    DEADLINE_EXCEEDED = "deadline_exceeded"  # the request's deadline passed before its answer
    CANCELLED = "cancelled"  # the client went away


class DomainError(Exception):
    """A failure of one request: `code`, `message`, `kind`, optional `details` and a retry hint
    (`retry_after_s`, for UNAVAILABLE)."""

    def __init__(self, kind: Kind, code: str, message: str, *, retry_after_s: float | None = None, details: dict | None = None):
        super().__init__(message)
        self.kind, self.code, self.message = kind, code, message
        self.retry_after_s, self.details = retry_after_s, details or {}

    def __repr__(self) -> str:
        return f"DomainError({self.kind.value}, {self.code!r}, {self.message!r})"


def invalid(code: str, message: str) -> DomainError:
    return DomainError(Kind.INVALID, code, message)


def not_found(code: str, message: str) -> DomainError:
    return DomainError(Kind.NOT_FOUND, code, message)


def too_large(code: str, message: str) -> DomainError:
    return DomainError(Kind.TOO_LARGE, code, message)


def conflict(code: str, message: str) -> DomainError:
    return DomainError(Kind.CONFLICT, code, message)


def unavailable(code: str, message: str, retry_after_s: float) -> DomainError:
    return DomainError(Kind.UNAVAILABLE, code, message, retry_after_s=retry_after_s)


# BundleError codes that mean "the client named something wrong" rather than "the bundle is bad";
# any other (checksum_mismatch, bad_manifest, backbone_mismatch, ...) is a bundle that cannot be served.
_BUNDLE_KIND = {"unknown_adapter": Kind.NOT_FOUND, "invalid_name": Kind.INVALID}
_IMAGE_KIND = {"invalid": Kind.INVALID, "unsupported": Kind.UNSUPPORTED, "too_large": Kind.TOO_LARGE}


def from_library(e: Exception, where: str | None = None) -> DomainError:
    """The library's errors (`BundleError`, `ImageError`, `RefError`) as domain errors; an image
    error's message is led by the image's name in the request (`images[3]: ...`)."""
    if isinstance(e, DomainError):
        return e
    if isinstance(e, BundleError):
        return DomainError(_BUNDLE_KIND.get(e.code, Kind.CONFLICT), e.code, str(e))
    if isinstance(e, ImageError):
        return DomainError(_IMAGE_KIND[e.kind], e.code, f"{where}: {e}" if where else str(e))
    if isinstance(e, RefError):
        return DomainError(Kind.INVALID, e.code, str(e))
    raise TypeError(f"not a library error: {e!r}")


LIBRARY_ERRORS = (BundleError, ImageError, RefError)


def public_message(message: str, roots: Iterable[Path]) -> str:
    """`message` as a client may read it, without the server's directories: under each root (the
    model store, the gallery directory) a bundle directory `adapters/<name>/<version>` becomes
    `name@version`, any other path is written relative to the root, and the root itself by its
    name. The server's log keeps the full paths."""
    for root in sorted({str(r).rstrip("/") for r in roots}, key=len, reverse=True):  # a root inside another first
        r = rf"(?<![\w./-]){re.escape(root)}"
        message = re.sub(rf"{r}/adapters/([a-z0-9][a-z0-9._-]*)/([a-z0-9][a-z0-9._-]*)", r"\1@\2", message)
        message = re.sub(rf"{r}/", "", message)
        message = re.sub(rf"{r}(?![\w.-])", lambda _, name=Path(root).name: name, message)
    return message
