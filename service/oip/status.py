"""The Open Inference Protocol's HTTP statuses for domain errors: one table, for `/v2` REST (its
error answers) and the gRPC door (its request metrics count each call under the status the same
outcome has on `/v2`, so one alert on `code=~"5.."` covers both).

The protocol answers any bad request with 400, where `/v1` says 415 or 422; a `Content-Encoding`
the server does not speak is about the HTTP message, not the tensors, and keeps HTTP's 415
(RFC 7694).
"""

from __future__ import annotations

from ..errors import DomainError, Kind

STATUS = {
    Kind.INVALID: 400,
    Kind.UNSUPPORTED: 400,
    Kind.TOO_LARGE: 413,
    Kind.UNAUTHENTICATED: 401,
    Kind.PERMISSION_DENIED: 403,
    Kind.NOT_FOUND: 404,
    Kind.CONFLICT: 409,
    Kind.UNAVAILABLE: 503,
    Kind.DEADLINE_EXCEEDED: 504,
    Kind.CANCELLED: 499,
}
BY_CODE = {"unsupported_content_encoding": 415}


def status(e: DomainError) -> int:
    return BY_CODE.get(e.code, STATUS[e.kind])
