"""Compress a response body the way providers do: gzip whole for JSON, and for SSE one stream with a flush per
chunk (each chunk decodable on arrival, as the Anthropic API sends `Content-Encoding: gzip` streams).

The fakes and the test replay use it; the stdlib's zlib for gzip and deflate, the `brotli` and `zstandard`
packages for br and zstd (dev dependencies: the server itself never compresses or decodes).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

ENCODINGS = ("gzip", "deflate", "br", "zstd")


def accepts(accept_encoding: str, encoding: str) -> bool:
    """Whether an `accept-encoding` value admits `encoding` (q=0 refuses it)."""
    for part in accept_encoding.lower().split(","):
        name, _, params = part.strip().partition(";")
        if name.strip() in (encoding, "*"):
            q = params.strip()
            return not (q.startswith("q=") and float(q[2:] or 0) == 0)
    return False


def pick(accept_encoding: str, preferred: tuple[str, ...] = ("gzip", "br", "zstd")) -> str | None:
    """What a provider answers with: its first preference the client accepts."""
    return next((e for e in preferred if accepts(accept_encoding, e)), None)


def stream_encoder(encoding: str) -> tuple[Callable[[bytes], bytes], Callable[[], bytes]]:
    """(encode a chunk and flush it, finish): every returned piece is decodable as soon as it arrives."""
    if encoding in ("gzip", "deflate"):
        z = zlib.compressobj(wbits=31 if encoding == "gzip" else 15)
        return (lambda b: z.compress(b) + z.flush(zlib.Z_SYNC_FLUSH)), z.flush
    if encoding == "br":
        import brotli

        c = brotli.Compressor()
        return (lambda b: c.process(b) + c.flush()), c.finish
    if encoding == "zstd":
        import zstandard

        zc = zstandard.ZstdCompressor().compressobj()
        return (lambda b: zc.compress(b) + zc.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)), zc.flush
    raise ValueError(f"unknown encoding {encoding!r}")


def encode(encoding: str, body: bytes) -> bytes:
    step, finish = stream_encoder(encoding)
    return step(body) + finish()


def decode(encoding: str, body: bytes) -> bytes:
    if encoding == "gzip":
        return zlib.decompress(body, wbits=31)
    if encoding == "deflate":
        return zlib.decompress(body)
    if encoding == "br":
        import brotli

        return bytes(brotli.decompress(body))
    if encoding == "zstd":
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj().decompress(body)
    raise ValueError(f"unknown encoding {encoding!r}")
