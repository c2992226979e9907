"""Issue 27, streams settled from Envoy's access-log report (server.settlement: envoy): the stream waits for its
report by request id, is priced from it exactly as from the stream itself, and settles at its estimate when no
report comes; a report nobody waits for moves nothing."""

from __future__ import annotations

import asyncio

import pytest

from nexus_extproc.app import build
from nexus_extproc.metering.usage import TokenUsage
from nexus_extproc.request.reports import EnvoyReport
from tests.builders import admitted_state
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
        assert not await proc.envoy_report(report(st))  # a late report moves nothing
        assert st.settle_source == "estimate"
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
