"""HTTP request bodies: `Content-Encoding` (gzip, deflate) decoded within the body limit.

Request compression as tritonclient's `request_compression_algorithm` sends it and Triton takes
it: `Content-Encoding: gzip` (RFC 1952) or `deflate` (the zlib format, RFC 1950, as HTTP/1.1
means it; raw RFC 1951 deflate is taken too).
"""

from __future__ import annotations

import zlib

from ..errors import DomainError, Kind, invalid, too_large

CONTENT_ENCODINGS = ("gzip", "deflate")


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """A request body as sent with `Content-Encoding` -> the body itself, at most `limit` bytes.

    The limit holds on the decompressed size, and decompression stops one byte past it, so a small
    body that inflates without end (a zip bomb) costs `limit` bytes, never more. Raises
    DomainError TOO_LARGE `body_too_large` past the limit, UNSUPPORTED `unsupported_content_encoding`
    for an encoding other than gzip / deflate / identity, INVALID `invalid_compressed_body` for
    bytes that are not (or not all) in the encoding named.
    """
    enc = (encoding or "").strip().lower()
    if enc in ("", "identity"):
        return body
    if enc not in CONTENT_ENCODINGS:
        raise DomainError(Kind.UNSUPPORTED, "unsupported_content_encoding", f"Content-Encoding {encoding!r} is not supported; send gzip, deflate or an uncompressed body",
                          details={"accept_encoding": ", ".join(CONTENT_ENCODINGS)})
    if enc == "gzip":
        wbits = 16 + zlib.MAX_WBITS
    else:  # a zlib header (CMF/FLG: method 8, check bits) or else raw deflate, as browsers accept both
        wbits = zlib.MAX_WBITS if len(body) >= 2 and body[0] & 0x0F == 8 and (body[0] << 8 | body[1]) % 31 == 0 else -zlib.MAX_WBITS
    out = bytearray()
    rest = body
    try:
        while True:  # gzip allows several members one after another (RFC 1952 2.2)
            d = zlib.decompressobj(wbits)
            out += d.decompress(rest, limit + 1 - len(out))
            if len(out) > limit:
                raise too_large("body_too_large", f"the decompressed request body is over the {limit}-byte limit")
            if not d.eof:
                raise invalid("invalid_compressed_body", f"the {enc} body is truncated")
            rest = d.unused_data
            if not rest or enc != "gzip":
                break
    except zlib.error as e:
        raise invalid("invalid_compressed_body", f"the body is not valid {enc} data ({e})") from None
    if rest:
        raise invalid("invalid_compressed_body", f"{len(rest)} bytes follow the end of the {enc} data")
    return bytes(out)
