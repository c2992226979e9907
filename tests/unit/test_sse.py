import json

from hypothesis import given, settings
from hypothesis import strategies as st

from nexus_extproc.apis.sse import SSEParser

STREAM = (
    b": keep-alive comment\n\n"
    b"event: message_start\r\ndata: {\"type\":\"message_start\",\"t\":\"\xc3\xa9t\xc3\xa9\"}\r\n\r\n"
    b"data: {\"a\":\n"
    b"data: 1}\n\n"
    b"data: {\"emoji\":\"\xf0\x9f\x98\x80\"}\n\n"
    b"data: [DONE]\n\n"
)


def parse_all(chunks):
    p = SSEParser()
    out = []
    for c in chunks:
        out += p.feed(c)
    out += p.flush()
    return out


def test_whole_stream_events():
    evs = parse_all([STREAM])
    data = [e.data for e in evs]
    assert data == [None, '{"type":"message_start","t":"été"}', '{"a":\n1}', '{"emoji":"😀"}', "[DONE]"]
    assert evs[1].event == "message_start"
    assert json.loads(evs[2].data) == {"a": 1}
    assert b"".join(e.raw for e in evs) == STREAM


def test_every_single_split_point_gives_same_events():
    whole = [(e.event, e.data) for e in parse_all([STREAM])]
    for i in range(len(STREAM) + 1):
        assert [(e.event, e.data) for e in parse_all([STREAM[:i], STREAM[i:]])] == whole, i


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_random_chunkings_give_same_events(cuts):
    cuts = sorted(set(cuts))
    chunks = [STREAM[a:b] for a, b in zip([0, *cuts], [*cuts, len(STREAM)], strict=True)]
    assert [(e.event, e.data) for e in parse_all(chunks)] == [(e.event, e.data) for e in parse_all([STREAM])]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=10))
def test_junk_never_raises_and_keeps_every_byte(chunks):
    evs = parse_all(chunks)
    assert b"".join(e.raw for e in evs) == b"".join(chunks)


def test_truncated_final_event_is_flushed():
    evs = parse_all([b'data: {"usage":1}\n\ndata: {"partial"'])
    assert [e.data for e in evs] == ['{"usage":1}', '{"partial"']


def test_oversized_event_is_bounded():
    p = SSEParser(max_event_bytes=100)
    evs = p.feed(b"data: " + b"x" * 500)
    assert evs and evs[0].overflow and p.overflows == 1
    assert p.pending() == b""
    evs = p.feed(b"yyy\n\ndata: ok\n\n")
    assert [e.data for e in evs] == [None, "ok"]
