"""Issue 27, streams settled from Envoy's access-log report (server.settlement: envoy): the stream waits for its
report by request id, is priced from it exactly as from the stream itself, and settles at its estimate when no
report comes; a report nobody waits for moves nothing."""

from __future__ import annotations

import asyncio
import json

import pytest
from envoy.data.accesslog.v3 import accesslog_pb2
from google.protobuf import struct_pb2

from nexus_dev.envoy_config import _json_usage_rules
from nexus_extproc.apis import TRANSLATORS
from nexus_extproc.app import build
from nexus_extproc.edge.access_log import report_of
from nexus_extproc.metering.usage import TokenUsage
from nexus_extproc.request.reports import EnvoyReport
from nexus_extproc.request.snapshot import snapshot
from nexus_extproc.request.state import RequestState
from tests.builders import admitted_state, request_doc
from tests.conftest import make_config

START = {"input_tokens": 10, "cache_read_input_tokens": 3000, "cache_creation_input_tokens": 1500,
         "output_tokens": 1}
DELTA = {"output_tokens": 15}


def processor(counter, tmp_path, wait: float = 5.0):
    cfg = make_config(budget={"monthly_limit_usd": 100}, store={"kind": "sqlite", "path": str(tmp_path / "l.db")},
                      server={"settlement": "envoy", "envoy_report_wait_secs": wait})
    return build(cfg, counter).processor


def report(st, **kw) -> EnvoyReport:
    return EnvoyReport(st.req_id, 200, **{"model": "claude-sonnet-4-5", "usage": DELTA, "start_usage": START, **kw})


async def _stream(proc):
    return await admitted_state(proc, "/v1/messages", "claude-sonnet-4-5", respond=False)


def test_a_reported_stream_settles_from_envoys_usage(counter, tmp_path):
    async def go():
        proc = processor(counter, tmp_path)
        st = await _stream(proc)
        await proc.finish(st)
        assert st.awaits_report and not st.finished  # no chunk came here: it waits for Envoy's report
        assert await proc.envoy_report(report(st))
        assert st.finished and st.settle_source == "usage"
        want = TokenUsage(4510, 15, cache_read_tokens=3000, cache_write_tokens=1500)
        assert st.usage.to_usage() == want and st.final_cost == st.price.cost_micros(want)
    asyncio.run(go())


def test_a_report_before_the_stream_ends_is_kept_for_it(counter, tmp_path):
    """Envoy may log the request before it closes the ext_proc stream."""
    async def go():
        proc = processor(counter, tmp_path)
        st = await _stream(proc)
        assert not await proc.envoy_report(report(st))
        await proc.finish(st)
        for _ in range(100):
            if st.finished:
                break
            await asyncio.sleep(0.01)
        assert st.finished and st.settle_source == "usage"
    asyncio.run(go())


def test_no_report_settles_at_the_estimate(counter, tmp_path):
    async def go():
        proc = processor(counter, tmp_path, wait=0.05)
        st = await _stream(proc)
        await proc.finish(st)
        for _ in range(100):
            if st.finished:
                break
            await asyncio.sleep(0.01)
        assert st.finished and (st.final_cost, st.settle_source) == (st.estimate, "estimate")
        key = st.admission.items[0]
        for _ in range(100):  # the estimate's settlement is written by a task of its own
            if (await proc.budget.ledger.totals(*key)).settled:
                break
            await asyncio.sleep(0.01)
        assert (await proc.budget.ledger.totals(*key)).settled == st.estimate
        # A report that comes late corrects it to the exact cost, once; no later entry moves it again.
        assert await proc.envoy_report(report(st))
        exact = st.final_cost
        assert st.settle_source == "usage" and exact != st.estimate
        assert (await proc.budget.ledger.totals(*key)).settled == exact
        assert not await proc.envoy_report(report(st, usage={"output_tokens": 0}))
        assert (await proc.budget.ledger.totals(*key)).settled == exact
        spend = [a for a in await proc.budget.ledger.spend(0, 4e9) if a.budget == key[0]]
        assert [(a.requests, a.cost) for a in spend] == [(1, exact)]
    asyncio.run(go())


def test_the_ext_proc_setting_never_waits(counter, tmp_path):
    async def go():
        cfg = make_config(budget={"monthly_limit_usd": 100}, store={"kind": "sqlite", "path": str(tmp_path / "l.db")})
        proc = build(cfg, counter).processor
        st = await _stream(proc)
        await proc.finish(st)
        assert st.finished and not st.awaits_report
    asyncio.run(go())


@pytest.mark.parametrize(("path", "model", "usage", "want"), [
    ("/v1/chat/completions", "gpt-4o", {"prompt_tokens": 100, "completion_tokens": 7,
                                        "prompt_tokens_details": {"cached_tokens": 64}},
     TokenUsage(100, 7, cache_read_tokens=64)),
    ("/v1/responses", "gpt-4.1", {"input_tokens": 2100, "output_tokens": 2,
                                  "input_tokens_details": {"cached_tokens": 2048}},
     TokenUsage(2100, 2, cache_read_tokens=2048)),
])
def test_openai_reports(counter, tmp_path, path, model, usage, want):
    async def go():
        proc = processor(counter, tmp_path)
        st = await admitted_state(proc, path, model, respond=False, stream_options={"include_usage": True})
        await proc.finish(st)
        assert await proc.envoy_report(EnvoyReport(st.req_id, 200, model=model, usage=usage))
        assert st.settle_source == "usage" and st.usage.to_usage() == want
    asyncio.run(go())


@pytest.mark.parametrize(("path", "model", "usage", "want"), [
    ("/v1/chat/completions", "gpt-4o", {"prompt_tokens": 100, "completion_tokens": 7, "total_tokens": 107,
                                        "prompt_tokens_details": {"cached_tokens": 64}},
     TokenUsage(100, 7, cache_read_tokens=64)),
    ("/v1/messages", "claude-sonnet-4-5", {**START, **DELTA, "server_tool_use": {"web_search_requests": 2}},
     TokenUsage(4510, 15, cache_read_tokens=3000, cache_write_tokens=1500, web_searches=2)),
    ("/v1/embeddings", "text-embedding-3-small", {"prompt_tokens": 8, "total_tokens": 8}, TokenUsage(8, 0)),
])
def test_a_json_answer_settles_from_its_reported_usage(counter, tmp_path, path, model, usage, want):
    """A JSON answer waits for its report too (json_to_metadata read it in Envoy) and is priced from it as from
    the body; the request asked the provider for identity (Envoy's decompressors would stall the filter)."""
    async def go():
        proc = processor(counter, tmp_path)
        st = RequestState()
        proc.request_headers(st, {":method": "POST", ":path": path, "content-type": "application/json",
                                  "accept-encoding": "gzip, br"}, False)
        doc = request_doc(path, model, stream=False)
        r = await proc.request_body(st, json.dumps(doc).encode())
        assert ("accept-encoding", "identity") in r.set_headers
        await proc.forwarded(st)
        await proc.finish(st)
        assert st.awaits_report and not st.finished
        assert await proc.envoy_report(EnvoyReport(st.req_id, 200, model=model, usage=usage))
        assert st.finished and st.settle_source == "usage" and st.usage.to_usage() == want
    asyncio.run(go())


def _entry(fields: dict[str, struct_pb2.Value]) -> accesslog_pb2.HTTPAccessLogEntry:
    entry = accesslog_pb2.HTTPAccessLogEntry()
    md = entry.common_properties.metadata.filter_metadata
    md["nexus.extproc"].CopyFrom(struct_pb2.Struct(fields={"request_id": struct_pb2.Value(string_value="r1")}))
    md["nexus.usage"].CopyFrom(struct_pb2.Struct(fields=fields))
    entry.response.response_code.value = 200
    return entry


def test_json_usage_leaves_are_nested_back_into_the_block():
    n = lambda v: struct_pb2.Value(number_value=v)  # noqa: E731
    rep = report_of(_entry({"model": struct_pb2.Value(string_value="gpt-4o-2024-08-06"),
                            "usage.prompt_tokens": n(100), "usage.completion_tokens": n(7),
                            "usage.prompt_tokens_details.cached_tokens": n(64),
                            "usage.completion_tokens_details.reasoning_tokens": n(-1),  # not a count
                            "usage.total_tokens": n(float("nan")),
                            "usage.prompt_tokens_details.audio_tokens": struct_pb2.Value(string_value="3")}))
    assert rep is not None and rep.model == "gpt-4o-2024-08-06"
    assert rep.usage == {"prompt_tokens": 100, "completion_tokens": 7, "prompt_tokens_details": {"cached_tokens": 64}}
    assert isinstance(rep.usage["prompt_tokens"], int)
    # A stream's usage object (sse_to_metadata's JSON text) is taken whole; no leaves at all is no usage.
    rep = report_of(_entry({"usage": struct_pb2.Value(string_value='{"output_tokens": 15}')}))
    assert rep is not None and rep.usage == {"output_tokens": 15}
    rep = report_of(_entry({}))
    assert rep is not None and rep.usage is None


def test_envoy_copies_every_usage_field_the_price_database_reads():
    """The json_to_metadata rules come from genai-prices' extractors for our APIs: a field it learns to read is
    copied without a change here."""
    from genai_prices import data_snapshot

    rules = {tuple(s["key"] for s in r["selectors"]) for r in _json_usage_rules()}
    for p in data_snapshot.get_snapshot().providers:
        for e in p.extractors or []:
            if (p.id, e.api_flavor) in {(t.family, t.usage_flavor) for t in TRANSLATORS.values()}:
                for m in e.mappings:
                    path = (m.path,) if isinstance(m.path, str) else tuple(m.path)
                    assert ("usage", *path) in rules, (p.id, e.api_flavor, path)
    assert ("model",) in rules and ("usage", "total_tokens") in rules


def _pods(counter, tmp_path, wait: float = 0.2):
    """Two server processes on one ledger, as two pods (or workers) behind one Service."""
    return processor(counter, tmp_path, wait), processor(counter, tmp_path, wait)


async def _settled(proc, key) -> int:
    return (await proc.budget.ledger.totals(*key)).settled


def _snapshot_report(st, owner, **kw) -> EnvoyReport:
    return EnvoyReport(st.req_id, kw.pop("status", 200), snapshot=snapshot(st), instance=owner.instance,
                       **{"model": "claude-sonnet-4-5", "usage": DELTA, "start_usage": START, **kw})


def test_a_report_reaching_another_process_settles_there_from_the_snapshot(counter, tmp_path):
    """The access-log stream reached the other pod: it settles the request exactly from the snapshot; the
    admitting process, finding no report by its deadline, charges nothing more (its estimate is not applied)."""
    async def go():
        a, b = _pods(counter, tmp_path)
        st = await _stream(a)
        key = st.admission.items[0]
        await a.finish(st)
        assert st.awaits_report
        assert await b.envoy_report(_snapshot_report(st, a))
        exact = await _settled(b, key)
        assert exact > 0 and exact != st.estimate
        for _ in range(100):
            if st.finished:
                break
            await asyncio.sleep(0.01)
        assert st.finished and st.settle_source == "estimate"  # a's own view: no report came to it
        await asyncio.sleep(0.1)
        assert await _settled(a, key) == exact and (await a.budget.ledger.totals(*key)).reserved == 0
        spend = [x for x in await a.budget.ledger.spend(0, 4e9) if x.budget == key[0]]
        assert [(x.requests, x.cost, x.input_tokens) for x in spend] == [(1, exact, 4510)]
    asyncio.run(go())


def test_a_report_after_the_estimate_corrects_it_from_another_process(counter, tmp_path):
    async def go():
        a, b = _pods(counter, tmp_path, wait=0.05)
        st = await _stream(a)
        key = st.admission.items[0]
        await a.finish(st)
        for _ in range(100):
            if await _settled(a, key):
                break
            await asyncio.sleep(0.01)
        assert await _settled(a, key) == st.estimate
        assert await b.envoy_report(_snapshot_report(st, a))
        corrected = await _settled(b, key)
        assert corrected != st.estimate and corrected > 0
        assert not await b.envoy_report(_snapshot_report(st, a, usage={"output_tokens": 0}))
        assert await _settled(b, key) == corrected
    asyncio.run(go())


def test_an_upstream_error_reported_elsewhere_releases_and_the_estimate_never_lands(counter, tmp_path):
    async def go():
        a, b = _pods(counter, tmp_path)
        st = await _stream(a)
        key = st.admission.items[0]
        await a.finish(st)
        assert await b.envoy_report(_snapshot_report(st, a, status=429, usage=None, start_usage=None))
        for _ in range(100):
            if st.finished:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        t = await a.budget.ledger.totals(*key)
        assert (t.settled, t.reserved) == (0, 0)
    asyncio.run(go())


def test_a_report_for_its_own_request_waits_for_the_stream_and_snapshots_are_checked(counter, tmp_path):
    async def go():
        a, b = _pods(counter, tmp_path)
        st = await _stream(a)
        rep = _snapshot_report(st, a)
        assert not await a.envoy_report(rep)  # its own, before the stream ended: kept for it
        await a.finish(st)
        for _ in range(100):
            if st.finished:
                break
            await asyncio.sleep(0.01)
        assert st.settle_source == "usage"
        # Garbage where a snapshot should be settles nothing.
        for bad in ("{", '{"v": 2}', '{"v": 1, "p": "/v1/messages"}', "x" * 10_000, 7):
            assert not await b.envoy_report(EnvoyReport("other", 200, usage=DELTA, snapshot=bad, instance="z"))
    asyncio.run(go())


def test_a_report_without_final_usage_charges_the_reservation(counter, tmp_path):
    """The client left after message_start: Envoy saw the input usage but no output count. The server saw no
    text either, so the request is charged what it reserved, not its prompt alone."""
    async def go():
        proc = processor(counter, tmp_path)
        st = await _stream(proc)
        await proc.finish(st)
        assert await proc.envoy_report(report(st, usage=None))
        assert st.finished and (st.final_cost, st.settle_source) == (st.estimate, "estimate")
        assert (await proc.budget.ledger.totals(*st.admission.items[0])).settled == st.estimate
    asyncio.run(go())


@pytest.mark.parametrize(("setting", "declared", "waits"), [
    ("auto", True, True), ("auto", False, False), ("envoy", False, True), ("ext_proc", True, False)])
def test_auto_follows_what_each_streams_envoy_declares(counter, tmp_path, setting, declared, waits):
    """server.settlement: auto (the default) waits for a report only where the stream's Envoy said it reads the
    response itself (initial metadata x-nexus-settlement: envoy); a forced setting ignores the declaration."""
    async def go():
        cfg = make_config(budget={"monthly_limit_usd": 100}, store={"kind": "sqlite", "path": str(tmp_path / "l.db")},
                          server={"settlement": setting})
        proc = build(cfg, counter).processor
        st = RequestState(envoy_declared=declared)
        proc.request_headers(st, {":method": "POST", ":path": "/v1/messages", "content-type": "application/json"},
                             False)
        await proc.request_body(st, json.dumps(request_doc("/v1/messages", "claude-sonnet-4-5", True)).encode())
        await proc.forwarded(st)
        await proc.finish(st)
        assert st.awaits_report is waits and st.finished is not waits
    asyncio.run(go())


@pytest.mark.parametrize(("settlement", "client", "stream", "upstream"), [
    ("ext_proc", "compress", False, "identity"),  # nothing the client takes is readable: not "any coding"
    ("ext_proc", "br, compress", False, "br"),  # narrowed to what the server reads
    ("ext_proc", "gzip", False, None),  # readable as it is: left alone
    ("ext_proc", None, False, None),  # the client said nothing: nothing said for it
    ("envoy", None, False, "identity"),  # json_to_metadata reads JSON uncompressed only
    ("envoy", "gzip, deflate", True, "gzip"),  # a stream Envoy decodes: what its decompressors read
])
def test_what_the_provider_may_compress_with(counter, tmp_path, settlement, client, stream, upstream):
    """The accept-encoding the provider gets (None: the client's, untouched). A narrowing that leaves nothing says
    identity outright: removing the header would allow any coding, one the client may not read."""
    async def go():
        cfg = make_config(budget={"monthly_limit_usd": 100}, store={"kind": "sqlite", "path": str(tmp_path / "l.db")},
                          server={"settlement": settlement})
        proc = build(cfg, counter).processor
        st = RequestState()
        headers = {":method": "POST", ":path": "/v1/messages", "content-type": "application/json"}
        if client is not None:
            headers["accept-encoding"] = client
        proc.request_headers(st, headers, False)
        r = await proc.request_body(st, json.dumps(request_doc("/v1/messages", "claude-sonnet-4-5",
                                                               stream=stream)).encode())
        assert dict(r.set_headers).get("accept-encoding") == upstream, r.set_headers
        assert "accept-encoding" not in r.remove_headers
    asyncio.run(go())
