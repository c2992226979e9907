"""Reading compressed responses (issue 26): every encoding providers use, chunk by chunk as they flush it,
and bounded against bodies that decode to far more than they weigh."""

from __future__ import annotations

import zlib

import pytest

from nexus_dev.fakes.compress import encode, stream_encoder
from nexus_extproc.apis.content_encoding import DecodeError, Decoder, decoder_for, supported, upstream_accept_encoding

SSE = b"".join(b'data: {"type":"content_block_delta","delta":{"text":"tok %d"}}\n\n' % i for i in range(200))


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd"])
def test_each_flushed_chunk_decodes_on_arrival(encoding):
    step, finish = stream_encoder(encoding)
    d = decoder_for(encoding)
    assert d is not None
    seen = b""
    for i in range(0, len(SSE), 700):
        piece = SSE[i:i + 700]
        seen += d.feed(step(piece))
        assert seen == SSE[:i + len(piece)]  # nothing held back: the usage event is readable when it arrives
    assert seen + d.feed(finish()) == SSE


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd"])
def test_a_decompression_bomb_stops_at_the_limit(encoding):
    bomb = encode(encoding, b"\0" * (16 << 20))  # 16 MiB of zeros: a few KB compressed
    assert len(bomb) < 100_000
    d = decoder_for(encoding)
    assert d is not None
    limited = Decoder(d._feed, limit=1 << 20)
    with pytest.raises(DecodeError):
        limited.feed(bomb)
    assert limited.decoded <= 1 << 20


def test_garbage_is_a_decode_error_not_a_crash():
    for enc in ("gzip", "br", "zstd"):
        d = decoder_for(enc)
        assert d is not None
        with pytest.raises(DecodeError):
            d.feed(b"\x00not compressed at all" * 10)
    assert decoder_for("compress") is None and decoder_for("gzip, br") is None


def test_raw_deflate_from_a_zlib_stream():
    assert decoder_for("deflate").feed(zlib.compress(b"{}")) == b"{}"  # type: ignore[union-attr]


def test_accept_encoding_is_narrowed_to_what_is_read():
    readable = supported()
    assert set(readable) == {"gzip", "deflate", "br", "zstd"}
    assert upstream_accept_encoding("gzip, deflate, zstd", readable) == "gzip, deflate, zstd"
    assert upstream_accept_encoding("br;q=1.0, compress, identity;q=0.5", readable) == "br;q=1.0, identity;q=0.5"
    assert upstream_accept_encoding("compress", readable) is None
    assert upstream_accept_encoding(None, readable) is None
