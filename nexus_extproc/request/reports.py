"""Responses whose usage Envoy reads (server.settlement: envoy): settled from the access-log report.

With the response side out of ext_proc, the server sees no byte of such a response: Envoy's sse_to_metadata filter
(streams) or json_to_metadata filter (JSON answers) keeps the answered model and the usage in dynamic metadata,
and the gRPC access log brings them here when the response is over. The ext_proc stream ends first, so its state
waits here, by request id, for the report; one that does not come within `server.envoy_report_wait_secs` settles
at the estimate it reserved (the access log is at most once). A stream's usage is rebuilt into the events the
API's profile reads from a stream, a JSON answer's into the body it reads from one, so either is priced exactly
as if the server had read the response itself.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from nexus_extproc.ledger import SpendRecord
from nexus_extproc.ops import metrics
from nexus_extproc.request.settle import Settlement
from nexus_extproc.request.snapshot import restore
from nexus_extproc.request.state import RequestState

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EnvoyReport:
    """One access-log entry, in plain terms (the edge reads the protobuf)."""

    req_id: str
    status: int
    model: Any = None
    # The last `usage` object seen in a stream (OpenAI, Anthropic's message_delta, Responses), or a JSON answer's
    usage: Any = None
    start_usage: Any = None  # Anthropic's `message_start` usage
    snapshot: Any = None  # what the request phase wrote for any process to settle it (request/snapshot.py)
    instance: str = ""  # the process that admitted it


# Reports that came before their ext_proc stream ended (Envoy may log the request before it closes the ext_proc
# stream): kept briefly, bounded, for the stream to find when it parks.
EARLY_REPORTS_MAX = 10_000
# Requests settled at their estimate because no report came in time: kept for LATE_WAIT_FACTOR times the report
# wait (bounded), so a report that comes late still corrects the settlement.
LATE_MAX = 10_000
LATE_WAIT_FACTOR = 10


class Reports(Settlement):
    def awaits_report(self, state: RequestState) -> bool:
        """A forwarded request whose response never reached this server: Envoy reports its usage. (A stream whose
        usage chunk the server hides, rather than Envoy's Lua filter, reads its response itself.)"""
        return (state.envoy_settles and state.forwarded and (state.envoy_reads or not state.response_started)
                and not state.finished
                and state.settle_source is None and state.admission is not None and state.parsed is not None
                and not state.server_hides_usage)

    def park(self, state: RequestState) -> None:
        state.awaits_report = True
        loop = asyncio.get_running_loop()
        early = self._early.pop(state.req_id, None)
        if early is not None:
            self._spawn(self._apply(state, early[1]))
            return
        timer = loop.call_later(self.config.server.envoy_report_wait_secs, self._report_missing, state.req_id)
        self._awaiting[state.req_id] = (state, timer)

    def _report_missing(self, req_id: str) -> None:
        entry = self._awaiting.pop(req_id, None)
        if entry is None:
            return
        state = entry[0]
        self._settle_at_estimate(state, missing=True)  # finish() counts it missing, or settled elsewhere meanwhile
        self._spawn(self.finish(state))
        now = asyncio.get_running_loop().time()
        horizon = now - LATE_WAIT_FACTOR * self.config.server.envoy_report_wait_secs
        while self._late:
            rid, (seen, _) = next(iter(self._late.items()))
            if seen >= horizon and len(self._late) < LATE_MAX:
                break
            del self._late[rid]
        self._late[req_id] = (now, state)

    @staticmethod
    def _settle_at_estimate(state: RequestState, missing: bool = False) -> None:
        state.awaits_report, state.report_missing = False, missing
        state.final_cost, state.settle_source = state.estimate, "estimate"

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def envoy_report(self, report: EnvoyReport) -> bool:
        """Settle the stream the report names; False when none waits for it (settled already, another process's,
        or not ours: nothing moves)."""
        entry = self._awaiting.pop(report.req_id, None)
        if entry is None:
            late = self._late.pop(report.req_id, None)
            if late is not None:
                return await self._correct(late[1], report)
            if self._settlement != "ext_proc" and report.snapshot is not None and report.instance != self.instance:
                return await self._settle_elsewhere(report)
            # Ours, and its stream has not ended yet (Envoy may log before it closes the ext_proc stream).
            self._keep_early(report)
            return False
        state, timer = entry
        timer.cancel()
        await self._apply(state, report)
        return True

    async def _settle_elsewhere(self, report: EnvoyReport) -> bool:
        """A report for a request another process admitted (another pod or worker took the access-log stream):
        settled here from the request's snapshot. The ledger keeps it once: the admitting process, finding no
        report by its deadline, settles at the estimate only while the request is still reserved, and a report
        after that estimate corrects it."""
        state = restore(report.snapshot, report.req_id, self.router, self.prices)
        if state is None or state.admission is None:
            metrics.envoy_reports.labels("unmatched").inc()
            return False
        adm = state.admission
        self._read_report(state, report)
        state.response_complete = True
        if state.response_status >= 400 and not state.usage_final:
            await self.budget.release(state.req_id, adm)
            metrics.envoy_reports.labels("released_elsewhere").inc()
            metrics.settlements.labels("released").inc()
            return True
        cost, source, record = self._priced(state)
        if not await self.budget.settle(state.req_id, adm, cost, record):
            # Settled already: at the estimate by its own process (then corrected here), or from this very report.
            done = source == "usage" and await self.budget.correct(state.req_id, adm, cost, record)
            metrics.envoy_reports.labels("corrected" if done else "unmatched").inc()
            return done
        metrics.envoy_reports.labels("settled_elsewhere").inc()
        metrics.settlements.labels(source).inc()
        return True

    async def _correct(self, state: RequestState, report: EnvoyReport) -> bool:
        """A report after its request settled at the estimate: the settlement becomes the exact one, once (the
        ledger corrects only an estimate). Which entry wins: the first report; none moves an exact settlement."""
        adm = state.admission
        if adm is None or state.route is None or state.price is None:
            return False
        self._read_report(state, report)
        state.final_cost, state.settle_source = None, None
        cost, source, record = self._priced(state)
        if source != "usage":
            return False
        done = await self.budget.correct(state.req_id, adm, cost, record)
        metrics.envoy_reports.labels("corrected" if done else "unmatched").inc()
        return done

    def _priced(self, state: RequestState) -> tuple[int, str, SpendRecord]:
        """A request read from its report, priced and recorded: what settling it elsewhere or correcting it
        writes."""
        cost, source = self.compute_final_cost(state)
        return cost, source, self._record(state, cost, source)

    def _read_report(self, state: RequestState, report: EnvoyReport) -> None:
        stream = state.parsed is not None and state.parsed.stream
        state.response_status, state.response_started, state.streaming = report.status, True, stream
        state.envoy_reads = False  # read now: settle, do not wait again
        tr = state.translator
        if tr is not None and not stream:
            u = tr.response_usage({"model": report.model, "usage": report.usage}) if report.usage else None
            if u is not None:
                state.usage.merge(u)
                state.usage_final = u.complete
        elif tr is not None:
            for event, doc in tr.reported_events(report.model, report.usage, report.start_usage):
                info = tr.stream_event(event, doc)
                if info.usage is not None:
                    state.usage.merge(info.usage)
                    state.usage_final = state.usage_final or info.final
        if not state.usage_final and report.status < 400:
            # No final usage in Envoy's report: the client left (or the stream broke) before the usage event,
            # or the answer carried none. The server saw none of the text to count, and Envoy's byte count says
            # little (an SSE event of one token is ~150 bytes): charged the reservation, the amount the budget
            # admitted it on, as a process that died would be (docs/streaming.md).
            self._settle_at_estimate(state)

    async def _apply(self, state: RequestState, report: EnvoyReport) -> None:
        state.awaits_report = False
        self._read_report(state, report)
        state.response_complete = True
        # no_usage: an answer whose report carried no final usage, settled at its estimate (a client that left
        # early, an answer without usage, a JSON answer compressed against the server's identity request).
        read = state.usage_final or (state.response_status or 0) >= 400
        metrics.envoy_reports.labels("settled" if read else "no_usage").inc()
        await self.finish(state)

    def _keep_early(self, report: EnvoyReport) -> None:
        """Unmatched for now: its stream may still be ending. Kept for twice the report wait, at most
        EARLY_REPORTS_MAX; one nobody claims by then is counted as unmatched."""
        now = asyncio.get_running_loop().time()
        horizon = now - 2 * self.config.server.envoy_report_wait_secs
        while self._early:
            rid, (seen, _) = next(iter(self._early.items()))
            if seen >= horizon and len(self._early) < EARLY_REPORTS_MAX:
                break
            del self._early[rid]
            metrics.envoy_reports.labels("unmatched").inc()
        self._early[report.req_id] = (now, report)

    async def settle_awaiting(self) -> None:
        """Shutdown: what still waits for a report settles at its estimate now, not after the reaper's TTL."""
        for req_id in list(self._awaiting):
            state, timer = self._awaiting.pop(req_id)
            timer.cancel()
            self._settle_at_estimate(state, missing=True)
            await self.finish(state)
