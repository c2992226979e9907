"""Reading a compressed response: the provider's bytes go to the client as they are, and the filter reads a
decoded copy for the usage.

Providers compress whatever the client allows (the Anthropic API answers its SDKs with gzip, SSE included), so a
filter that reads only plain bytes settles nothing from the provider's usage. Envoy's decompressor filters cannot
sit in front of ext_proc's response processing in Envoy 1.40: at the end of a decoded body they add trailers, and
ext_proc, holding the last (empty) chunk, never sees them, so the response never completes (docs/streaming.md has
the trace). So the copy is decoded here, with the stdlib's zlib and the `brotli` and `zstandard` packages:
streaming decoders, one per response, each chunk decodable on arrival as the provider flushed it.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

# What a decoded copy may grow to; past it the response is read no further (settled from our counts). A
# compressed body is capped by Envoy's buffer limit (8 MiB), its decoded size only by this.
MAX_DECODED_BYTES = 64 << 20


class DecodeError(Exception):
    """The bytes do not decode as their content-encoding says, or decode past MAX_DECODED_BYTES."""


# Each decoder yields at most `room` bytes a call (it raises past that): a small compressed body may claim
# gigabytes (a decompression bomb), and a limit checked only after decoding would already have spent the memory.
Feed = Callable[[bytes, int], bytes]


def _zlib() -> Feed:
    # 47 = 32 + 15: a gzip or zlib header, detected; HTTP's `deflate` is zlib-wrapped (RFC 9110 §8.4.1.2).
    z = zlib.decompressobj(wbits=47)

    def feed(data: bytes, room: int) -> bytes:
        try:
            out = z.decompress(data, room + 1)
        except zlib.error as e:
            raise DecodeError(str(e)) from None
        if len(out) > room:
            raise DecodeError("decoded response exceeds the read limit")
        return out

    return feed


def _brotli() -> Feed | None:
    try:
        import brotli
    except ImportError:
        return None
    d = brotli.Decompressor()

    def feed(data: bytes, room: int) -> bytes:
        try:
            out = d.process(data, output_buffer_limit=room + 1)
            while len(out) <= room and not d.can_accept_more_data():  # output held back by the limit
                out += d.process(b"", output_buffer_limit=room + 1 - len(out))
        except brotli.error as e:
            raise DecodeError(str(e)) from None
        if len(out) > room:
            raise DecodeError("decoded response exceeds the read limit")
        return bytes(out)

    return feed


# zstandard's streaming decoder takes no output limit, so input goes in slices small enough that one slice's
# worst case (about 2.7 MB from 256 bytes of RLE blocks) stays a bounded overshoot.
_ZSTD_SLICE = 256


def _zstd() -> Feed | None:
    try:
        import zstandard
    except ImportError:
        return None
    d = zstandard.ZstdDecompressor().decompressobj()

    def feed(data: bytes, room: int) -> bytes:
        out = bytearray()
        try:
            for i in range(0, len(data), _ZSTD_SLICE):
                out += d.decompress(data[i:i + _ZSTD_SLICE])
                if len(out) > room:
                    raise DecodeError("decoded response exceeds the read limit")
        except zstandard.ZstdError as e:
            raise DecodeError(str(e)) from None
        return bytes(out)

    return feed


_FACTORIES: dict[str, Callable[[], Feed | None]] = {
    "gzip": _zlib, "x-gzip": _zlib, "deflate": _zlib, "br": _brotli, "zstd": _zstd}


def supported() -> tuple[str, ...]:
    """The encodings this process can read (br and zstd only with their packages installed)."""
    return tuple(e for e, f in _FACTORIES.items() if not e.startswith("x-") and f() is not None)


class Decoder:
    """One response's decoder: `feed` each chunk as it arrives, get the decoded bytes so far."""

    def __init__(self, feed: Feed, limit: int = MAX_DECODED_BYTES) -> None:
        self._feed = feed
        self.decoded = 0
        self._limit = limit

    def feed(self, data: bytes) -> bytes:
        out = self._feed(data, self._limit - self.decoded) if data else b""
        self.decoded += len(out)
        return out


def decoder_for(content_encoding: str) -> Decoder | None:
    """None for an encoding this process cannot read (or a stack of several, `gzip, br`: not seen from providers)."""
    f = _FACTORIES.get(content_encoding.strip().lower())
    feed = f() if f is not None else None
    return Decoder(feed) if feed is not None else None


def upstream_accept_encoding(client_value: str | None, readable: tuple[str, ...]) -> str | None:
    """The client's accept-encoding narrowed to what the filter can read, q-values kept; None: ask for identity.

    The provider then compresses only in ways both the client and the filter understand, and the client still
    gets exactly what it asked for."""
    if not client_value:
        return None
    keep = []
    for part in client_value.split(","):
        name = part.split(";", 1)[0].strip().lower()
        if name in readable or name == "identity":
            keep.append(part.strip())
    return ", ".join(keep) if keep else None
