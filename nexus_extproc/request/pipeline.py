"""The request path in plain Python: one `RequestState` per ext_proc stream, one method per phase.

Nothing here imports gRPC or Envoy's protobufs. The adapter in `server.py` turns each ProcessingRequest into
a call here and each `Reply` back into a ProcessingResponse, so the whole path is testable without gRPC.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from nexus_extproc.apis import ParsedRequest, Translator, for_path
from nexus_extproc.apis.errors import (
    NexusError,
    bad_request,
    internal_error,
    not_found,
    payload_too_large,
    render_error,
)
from nexus_extproc.apis.sse import SSEParser
from nexus_extproc.apis.usage import TokenUsage, UsageReport
from nexus_extproc.budget.policy import Action, Target
from nexus_extproc.budget.scopes import RequestFacts, api_key_of, hash_api_key
from nexus_extproc.budget.service import Admission, BudgetService
from nexus_extproc.config import NexusConfig
from nexus_extproc.ledger import ForwardNote, SpendRecord
from nexus_extproc.metering.money import format_usd, usd_float
from nexus_extproc.metering.pricing import PriceBook, ResolvedPrice, token_usage_counts
from nexus_extproc.metering.tokenizers import TokenCounter, heuristic_tokens
from nexus_extproc.ops import metrics
from nexus_extproc.request import headers as C
from nexus_extproc.request.calibration import Calibrator
from nexus_extproc.request.router import Route, Router

log = logging.getLogger("nexus_extproc.request.pipeline")

# Text kept per stream to count output tokens when a stream ends without usage; past this, chars/4.
MAX_STREAM_TEXT = 1 << 20


@dataclass(slots=True)
class Immediate:
    status: int
    body: bytes
    headers: list[tuple[str, str]]
    details: str


@dataclass(slots=True)
class Reply:
    """What one phase answers, in plain terms; the adapter renders it for its phase."""

    set_headers: list[tuple[str, str]] = field(default_factory=list)
    remove_headers: list[str] = field(default_factory=list)
    body: bytes | None = None
    clear_route_cache: bool = False
    immediate: Immediate | None = None
    stream_response_body: bool = False
    metadata: dict[str, Any] | None = None


@dataclass(slots=True)
class RequestState:
    """Everything one request carries from its first message to its settlement."""

    req_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started: float = field(default_factory=time.monotonic)
    path: str = ""
    family: str = "openai"
    translator: Translator | None = None
    client_nexus_headers: list[str] = field(default_factory=list)
    identity: dict[str, str] = field(default_factory=dict)  # trusted x-nexus-user/-team/-agent only
    api_key_hash: str | None = None
    parsed: ParsedRequest | None = None
    route: Route | None = None
    model: str | None = None
    price: ResolvedPrice | None = None
    asked_price: ResolvedPrice | None = None  # the cloud model's price when the request was rerouted
    priced_model: str | None = None  # the model settled at: the one that answered, when the database knows it
    tier: str = "heuristic"
    prompt_tokens: int = 0  # our count, as counted (calibration learns against this)
    prompt_estimate: int = 0  # what is reserved for: the count after calibration
    tool_calls: int = 0  # server-side tool calls (web search, ...) reserved for
    expected_output: int = 0
    estimate: int = 0
    admission: Admission | None = None
    added_stream_usage: bool = False
    response_status: int = 0
    streaming: bool = False
    sse: SSEParser | None = None
    usage: UsageReport = field(default_factory=UsageReport)
    usage_final: bool = False  # the provider's final usage was seen (JSON usage, or the stream's last event)
    out_text: list[str] = field(default_factory=list)
    out_chars: int = 0
    response_complete: bool = False
    final_cost: int | None = None
    settle_source: str | None = None
    finished: bool = False
    forwarded: bool = False  # the request-body reply went out without an immediate answer


def _has_lone_surrogate(doc: Any) -> bool:
    """JSON allows `\\ud800` alone, Unicode does not: such text cannot be re-encoded or forwarded as UTF-8.
    Only run when the raw body holds a surrogate escape at all."""
    try:
        json.dumps(doc, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return True
    return False


class OutputStats:
    """Observed output lengths per model, for the expected-output estimate (p95 of recent responses)."""

    def __init__(self, window: int) -> None:
        self._window = window
        self._seen: dict[str, list[int]] = {}

    def record(self, model: str, tokens: int) -> None:
        xs = self._seen.setdefault(model, [])
        xs.append(tokens)
        if len(xs) > self._window:
            del xs[: len(xs) - self._window]

    def p95(self, model: str) -> int | None:
        xs = self._seen.get(model)
        if not xs or len(xs) < 20:
            return None
        s = sorted(xs)
        return s[min(len(s) - 1, (len(s) * 95) // 100)]


class Processor:
    def __init__(self, config: NexusConfig, counter: TokenCounter, prices: PriceBook, budget: BudgetService,
                 router: Router) -> None:
        self.config = config
        self.counter = counter
        self.prices = prices
        self.budget = budget
        self.router = router
        self.outputs = OutputStats(config.estimation.p95_window)
        est = config.estimation
        self.calibration = Calibrator(est.calibration_half_life_hours * 3600, est.calibration_flush_secs,
                                      enabled=est.calibration)
        self._known_models = config.configured_models()
        self._background: set[asyncio.Task[None]] = set()
        self._trust_identity = config.identity.trust_identity_headers
        # Hash the caller's API key only when some budget is scoped by key (an HMAC per request otherwise).
        self._need_key = any(d.scope is not None and d.scope.api_key_hash for d in budget.defs)
        self._salt = os.environ.get(config.identity.api_key_salt_env, "").encode()
        if self._need_key and not self._salt:
            log.warning("budgets scoped by API key but $%s is empty: hashes use an empty salt",
                        config.identity.api_key_salt_env)

    # ---- helpers -------------------------------------------------------------------------------

    def model_label(self, model: str | None, price: ResolvedPrice | None) -> str:
        if model and (model in self._known_models or (price is not None and price.known)):
            return model
        return "other"

    def _error(self, state: RequestState, err: NexusError, reason: str) -> Reply:
        if err.status < 500:
            metrics.bad_requests.labels(reason).inc()
        headers = [("content-type", "application/json"), *err.headers.items()]
        if state.route is not None:
            headers.append((C.H_BACKEND_TYPE, state.route.backend_type))
        return Reply(immediate=Immediate(err.status, render_error(state.family, err), headers,
                                         f"nexus_{err.code}"))

    # ---- phases ----------------------------------------------------------------------------------

    def request_headers(self, state: RequestState, headers: dict[str, str], end_of_stream: bool) -> Reply:
        """ext_proc phase `request_headers`: pick the translator; the decision waits for the body."""
        state.path = headers.get(":path", "")
        state.family = "anthropic" if state.path.startswith("/v1/messages") else "openai"
        state.client_nexus_headers = [k for k in headers if k.startswith(C.CLIENT_HEADER_PREFIX)]
        if self._trust_identity:
            state.identity = {k: headers[h] for k, h in (("user", C.H_USER), ("team", C.H_TEAM), ("agent", C.H_AGENT))
                              if headers.get(h)}
        if self._need_key:
            key = api_key_of(headers)
            state.api_key_hash = hash_api_key(key, self._salt) if key else None
        state.translator = for_path(state.path)
        if state.translator is None:
            return self._error(state, not_found("path not served by the budget filter"), "unknown_path")
        if headers.get(":method", "POST") != "POST" or end_of_stream:
            return self._error(state, bad_request("a JSON request body is required"), "no_body")
        try:
            length = int(headers.get("content-length", "0") or 0)
        except ValueError:
            length = 0
        if length > self.config.server.max_request_body_bytes:
            return self._error(state, payload_too_large(self.config.server.max_request_body_bytes), "too_large")
        # Client-supplied x-nexus-* headers are removed now, so they never reach a route or an upstream.
        return Reply(remove_headers=list(state.client_nexus_headers))

    def _parse(self, state: RequestState, body: bytes) -> ParsedRequest:
        assert state.translator is not None
        if len(body) > self.config.server.max_request_body_bytes:
            raise payload_too_large(self.config.server.max_request_body_bytes)
        try:
            doc = json.loads(body)
        except UnicodeDecodeError:
            raise bad_request("request body is not UTF-8 encoded JSON") from None
        except ValueError:
            raise bad_request("request body is not valid JSON") from None
        if not isinstance(doc, dict):
            raise bad_request("request body must be a JSON object")
        if (b"\\ud" in body or b"\\uD" in body) and _has_lone_surrogate(doc):
            raise bad_request("request body contains an unpaired UTF-16 surrogate escape")
        return state.translator.parse(doc)

    async def _count(self, model: str, parsed: ParsedRequest) -> tuple[int, str]:
        t0 = time.perf_counter()
        if parsed.shape.total_bytes() > self.config.server.thread_tokenize_bytes:
            # tiktoken releases the GIL: a 100 KB prompt counts in a thread while other streams go on.
            tc = await asyncio.to_thread(self.counter.count_prompt, model, parsed.shape)
        else:
            tc = self.counter.count_prompt(model, parsed.shape)
        metrics.token_count_duration.observe(time.perf_counter() - t0)
        return tc.tokens + parsed.token_ids, tc.tier

    def _expected_output(self, model: str, parsed: ParsedRequest, translator: Translator) -> int:
        cap = parsed.max_output_tokens
        if cap is None:
            cap = translator.default_max_output
        typical = self.outputs.p95(model)
        if typical is None:
            typical = self.config.estimation.default_output_tokens
        return typical if cap is None else min(cap, typical)

    def _target(self, route: Route, model: str, prompt_tokens: int, expected_out: int,
                tool_calls: int = 0) -> tuple[Target, ResolvedPrice]:
        price = self.prices.resolve(route.provider, model)
        est = price.estimate_micros(prompt_tokens, expected_out, tool_calls)
        return Target(route.backend, route.backend_type, model, est), price  # type: ignore[arg-type]

    async def request_body(self, state: RequestState, body: bytes) -> Reply:
        """ext_proc phase `request_body` (BUFFERED): parse, count, price, decide, reserve, route.

        Whatever a client sends is answered in its API's error shape: a body that breaks parsing, counting or
        rewriting in a way the translators did not foresee (a wrong type deep in a field, nesting past the
        recursion limit, an unpaired surrogate) is still the client's error, a 400, never a reset stream that
        Envoy turns into a 500. A reservation already made for it is released."""
        try:
            return await self._request_body(state, body)
        except NexusError as e:
            reply = self._error(state, e, "too_large" if e.status == 413 else "malformed")
        except RecursionError:
            reply = self._error(state, bad_request("request body is nested too deeply"), "malformed")
        except UnicodeError:
            reply = self._error(state, bad_request("request body contains text that is not valid Unicode "
                                                   "(an unpaired surrogate escape)"), "malformed")
        except (TypeError, ValueError, AttributeError, KeyError, IndexError, OverflowError) as e:
            log.info("request refused: a field has an unexpected type or value", extra={"error": type(e).__name__})
            reply = self._error(state, bad_request("a field of the request has an unexpected type or value"),
                                "malformed")
        adm, state.admission = state.admission, None
        if adm is not None:
            await self.budget.release(state.req_id, adm)
        return reply

    async def _request_body(self, state: RequestState, body: bytes) -> Reply:
        assert state.translator is not None
        tr = state.translator
        try:
            parsed = self._parse(state, body)
            model = parsed.model or ""
            route = self.router.route(tr.family, model)
        except NexusError as e:
            return self._error(state, e, "too_large" if e.status == 413 else "malformed")
        state.parsed = parsed
        state.route = route
        prompt_tokens, tier = await self._count(model, parsed)
        state.prompt_tokens, state.tier = prompt_tokens, tier
        expected = self._expected_output(model, parsed, tr)
        state.expected_output = expected
        price = self.prices.resolve(route.provider, model)
        adj = self.calibration.adjust(self.model_label(model, price), tier, f"{tr.api}:{parsed.shape.kind}",
                                      prompt_tokens, parsed.shape.server_tools)
        state.prompt_estimate, state.tool_calls = adj.prompt_tokens, adj.tool_calls
        requested, price = self._target(route, model, adj.prompt_tokens, expected, adj.tool_calls)
        if price.source == "unpriced" or price.source == "fallback":
            metrics.unpriced_requests.inc()
            if price.source == "unpriced":
                return self._error(state, bad_request("the requested model has no known price", "unpriced_model"),
                                   "unpriced_model")
        metrics.token_count_tier.labels(tier, self.model_label(model, price)).inc()

        equivalent = None
        eq = self.router.equivalent(model, tr.family)
        eq_price = None
        if eq is not None and route.backend_type == "cloud":
            eq_route, eq_model = eq
            equivalent, eq_price = self._target(eq_route, eq_model, adj.prompt_tokens, expected)

        facts = RequestFacts(model, route.backend_type, state.api_key_hash, state.identity.get("user"),
                             state.identity.get("team"), state.identity.get("agent"))
        try:
            adm = await self.budget.admit(state.req_id, requested, equivalent, facts)
        except NexusError as e:
            metrics.requests_total.labels("rejected").inc()
            return self._error(state, e, "store_unavailable")
        state.admission = adm
        d = adm.decision
        metrics.requests_total.labels(d.action.value).inc()
        if d.action is Action.REJECT:
            log.info("request rejected by budget", extra={"status": d.status,
                                                           "model": self.model_label(model, price)})
            err = self.budget.reject_error(adm)
            assert isinstance(err, NexusError)
            return self._error(state, err, "budget")

        assert d.target is not None
        rerouted = d.action is Action.REROUTE
        if rerouted and eq is not None:
            state.route, state.model, state.price = eq[0], eq[1], eq_price
            state.asked_price = price
        else:
            state.model, state.price = model, price
        state.estimate = d.target.estimate_micros
        assert state.route is not None

        add_usage = parsed.stream and tr.stream_usage_option and not parsed.client_wants_stream_usage
        state.added_stream_usage = add_usage
        reply = Reply(clear_route_cache=True)
        reply.set_headers.append((C.UPSTREAM_HEADER, state.route.cluster))
        reply.remove_headers = [h for h in state.client_nexus_headers if h != C.UPSTREAM_HEADER]
        if rerouted or add_usage:
            new_body = tr.rewrite(parsed.doc, model=state.model if rerouted else None, add_stream_usage=add_usage)
            if len(new_body) > self.config.server.max_request_body_bytes:
                # Envoy would refuse the grown body with a plain-text 413 after we reserved; say it here.
                raise payload_too_large(self.config.server.max_request_body_bytes)
            reply.body = new_body
            reply.set_headers.append(("content-length", str(len(new_body))))
        if rerouted and state.route.backend_type == "local":
            reply.remove_headers.extend(C.CREDENTIAL_HEADERS)
        reply.metadata = {
            "request_id": state.req_id, "model": self.model_label(state.model, state.price),
            "backend_type": state.route.backend_type, "tokens_in": prompt_tokens,
            "cost_estimated_usd": usd_float(state.estimate), "decision": d.action.value,
            "token_tier": tier,
        }
        if log.isEnabledFor(logging.DEBUG):
            log.debug("decision", extra={"decision": d.action.value, "status": d.status,
                                         "backend": state.route.backend, "tier": tier})
        return reply

    def _budget_headers(self, state: RequestState) -> list[tuple[str, str]]:
        adm = state.admission
        out: list[tuple[str, str]] = []
        if adm is None or adm.view is None:
            return out
        view = adm.view
        d = adm.decision
        always = self.budget.always_headers
        if d.status != "Normal" or always:
            if adm.budget is not None:
                out.append((C.H_BUDGET_NAME, adm.budget))
            out.append((C.H_BUDGET_STATUS, d.status))
            out.append((C.H_BUDGET_UTILIZATION, f"{min(view.utilization(), 9999):.2f}"))
            out.append((C.H_BUDGET_REMAINING, format_usd(view.remaining_micros, 2)))
        if d.reason and d.action is Action.REROUTE:
            out.append((C.H_ROUTE_REASON, d.reason))
        return out

    def response_headers(self, state: RequestState, headers: dict[str, str]) -> Reply:
        """ext_proc phase `response_headers`: add X-Nexus-*; stream SSE bodies instead of buffering."""
        try:
            state.response_status = int(headers.get(":status", "0"))
        except ValueError:
            state.response_status = 0
        reply = Reply()
        if state.route is None:
            return reply
        reply.set_headers = [
            (C.H_COST_ESTIMATED, format_usd(state.estimate)),
            (C.H_BACKEND_TYPE, state.route.backend_type),
            (C.H_TOKEN_TIER, state.tier),
            (C.H_REQUEST_ID, state.req_id),
            *self._budget_headers(state),
        ]
        if "text/event-stream" in headers.get("content-type", ""):
            state.streaming = True
            state.sse = SSEParser()
            reply.stream_response_body = True
            reply.remove_headers.append("content-length")
        return reply

    def response_body(self, state: RequestState, chunk: bytes, end_of_stream: bool) -> Reply:
        """ext_proc phase `response_body`: BUFFERED for JSON (one message), STREAMED for SSE (per chunk)."""
        reply = Reply()
        tr = state.translator
        if tr is None or state.route is None:
            return reply
        if state.streaming and state.sse is not None:
            events = state.sse.feed(chunk)
            if end_of_stream:
                events += state.sse.flush()
            keep: list[bytes] = []
            for ev in events:
                drop = False
                if ev.data is not None and ev.data != "[DONE]":
                    try:
                        doc = json.loads(ev.data)
                        info = tr.stream_event(ev.event, doc) if isinstance(doc, dict) else None
                    except (ValueError, TypeError, AttributeError, KeyError, IndexError, RecursionError):
                        # The provider's bytes go to the client unchanged; only our reading of them is skipped.
                        info = None
                        metrics.sse_bad_events.inc()
                    if info is not None:
                        if info.usage is not None:
                            state.usage.merge(info.usage)
                            state.usage_final = state.usage_final or info.final
                        if info.text:
                            self._note_text(state, info.text)
                        drop = info.usage_only and state.added_stream_usage
                keep.append(b"" if drop else ev.raw)
            if state.added_stream_usage:
                # Only whole events go out (a partial one waits in the parser), so an unrequested usage
                # chunk can be removed whole and the client sees exactly the stream it asked for.
                out = b"".join(keep)
                if out != chunk:
                    reply.body = out
        else:
            if end_of_stream or chunk:
                try:
                    doc = json.loads(chunk) if chunk else None
                    u = tr.response_usage(doc) if isinstance(doc, dict) else None
                except (ValueError, TypeError, AttributeError, KeyError, IndexError, RecursionError):
                    u = None  # settled from our own counts, as a response without usage is
                if u is not None:
                    state.usage.merge(u)
                    state.usage_final = u.complete
        if end_of_stream:
            state.response_complete = True
            reply.metadata = self._final_metadata(state)
        return reply

    def _note_text(self, state: RequestState, text: str) -> None:
        state.out_chars += len(text)
        if state.out_chars <= MAX_STREAM_TEXT:
            state.out_text.append(text)

    def _streamed_output_tokens(self, state: RequestState) -> int:
        if state.out_chars > MAX_STREAM_TEXT:
            return heuristic_tokens(state.out_chars)
        return self.counter.count_text(state.model, state.out_text).tokens

    def _answered_price(self, state: RequestState) -> ResolvedPrice:
        """The model that answered is what the provider bills (`gpt-4o` asked, `gpt-4o-2024-05-13` answered).
        The request's price stays when the answer names nothing, a model the price database does not know,
        or comes from a local backend; an operator's price override for the asked model beats the database."""
        assert state.price is not None and state.route is not None
        answered = state.usage.model
        if not answered or answered == state.model or state.route.backend_type != "cloud":
            return state.price
        p = self.prices.resolve(state.route.provider, answered)
        if not p.known or (state.price.source == "override" and p.source != "override"):
            return state.price
        return p

    def _provider_counts(self, state: RequestState) -> dict[str, int]:
        """The provider's usage in genai-prices' own terms (its extractor for this API); our normalised fields
        only when the block is one the extractor refuses."""
        u = state.usage
        tr = state.translator
        if u.raw is not None and tr is not None:
            try:
                _, counts = self.prices.usage.extract(tr.family, tr.usage_flavor, {"usage": u.raw})
                return counts
            except ValueError:
                log.debug("usage block refused by the price database's extractor", extra={"api": tr.api})
        return token_usage_counts(u.to_usage())

    def compute_final_cost(self, state: RequestState) -> tuple[int, str]:
        """Provider usage if complete; else the prompt count plus output counted from what streamed."""
        if state.final_cost is not None and state.settle_source is not None:
            return state.final_cost, state.settle_source
        assert state.price is not None
        if state.usage_final and state.usage.complete:
            price = self._answered_price(state)
            state.priced_model = price.model
            cost, source = price.cost_micros(self._provider_counts(state)), "usage"
        else:
            # No response at all: only the output that was seen; a response without usage: what streamed, or
            # the expected output for a JSON answer (its usage block was missing).
            seen = state.streaming or state.response_status == 0
            out = self._streamed_output_tokens(state) if seen else state.expected_output
            u = state.usage
            usage = TokenUsage(
                input_tokens=u.input_tokens if u.input_tokens is not None else state.prompt_estimate,
                output_tokens=max(out, u.output_tokens or 0),
                cache_read_tokens=u.cache_read_tokens or 0,
                cache_write_tokens=u.cache_write_tokens or 0,
                web_searches=max(u.web_searches or 0, state.tool_calls),
            )
            cost, source = state.price.cost_micros(usage), "estimated"
        state.final_cost, state.settle_source = cost, source
        return cost, source

    def _final_metadata(self, state: RequestState) -> dict[str, Any] | None:
        if state.price is None or state.response_status >= 400:
            return None
        cost, source = self.compute_final_cost(state)
        return {"request_id": state.req_id, "cost_usd": usd_float(cost), "settlement": source,
                "tokens_in": state.usage.input_tokens if state.usage.input_tokens is not None
                else state.prompt_tokens,
                "tokens_out": state.usage.output_tokens or 0}

    def _avoided(self, state: RequestState, cost: int) -> int:
        """A reroute's saving: the asked-for model's price for the usage the local model reported."""
        if state.asked_price is None:
            return 0
        u = state.usage.to_usage() if state.usage_final else TokenUsage(state.prompt_estimate,
                                                                        state.expected_output)
        return max(0, state.asked_price.cost_micros(u) - cost)

    def internal_error(self, state: RequestState) -> Reply:
        """A bug on the request side: answer in the client's shape and give back what was reserved."""
        adm, state.admission = state.admission, None
        if adm is not None:
            task = asyncio.get_running_loop().create_task(self.budget.release(state.req_id, adm))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return self._error(state, internal_error(), "internal")

    def forwarded(self, state: RequestState) -> None:
        """The request is on its way upstream: from here on the provider bills it, so if this process dies
        before the settlement the reaper charges the reservation instead of releasing it."""
        state.forwarded = True
        adm = state.admission
        if adm is None or not adm.reserved or state.route is None:
            return
        note = ForwardNote(self.model_label(state.model, state.price), state.route.backend,
                           self.model_label(state.parsed.model if state.parsed else state.model,
                                            state.asked_price or state.price),
                           state.prompt_tokens)
        task = asyncio.get_running_loop().create_task(self.budget.mark_forwarded(state.req_id, note))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def finish(self, state: RequestState) -> None:
        """Runs once per stream whatever ended it (clean end, reset, client abort): settle or release."""
        if state.finished:
            return
        state.finished = True
        adm = state.admission
        if adm is None or state.route is None or state.price is None:
            return
        # The charge rule (docs/budgets.md): an upstream error without usage is not billed; a request that
        # never left is not billed; one that left and got no answer (the client went away, the stream was
        # reset) is billed for its prompt plus whatever output was seen streaming, since the provider did
        # the work whether or not anyone read it.
        not_billed = state.response_status >= 400 or (state.response_status == 0 and not state.forwarded)
        if not_billed and not state.usage_final:
            await self.budget.release(state.req_id, adm)
            metrics.settlements.labels("released").inc()
            return
        cost, source = self.compute_final_cost(state)
        usage = state.usage
        if state.model and usage.output_tokens is not None:
            self.outputs.record(state.model, usage.output_tokens)
        if source == "usage" and state.asked_price is None and usage.input_tokens is not None \
                and state.parsed is not None:
            self.calibration.observe(self.model_label(state.model, state.price), state.tier,
                                     f"{state.translator.api}:{state.parsed.shape.kind}"
                                     if state.translator else state.parsed.shape.kind,
                                     state.prompt_tokens, usage.input_tokens,
                                     usage.web_searches or 0)
        priced = self.prices.resolve(state.route.provider, state.priced_model) if state.priced_model else state.price
        asked = state.parsed.model if state.parsed is not None else state.model
        record = SpendRecord(ts=time.time(), model=self.model_label(priced.model, priced),
                             model_requested=self.model_label(asked, state.asked_price or state.price),
                             backend=state.route.backend,
                             input_tokens=usage.input_tokens if usage.input_tokens is not None
                             else state.prompt_tokens,
                             output_tokens=usage.output_tokens or 0, estimate=state.estimate, source=source,
                             avoided=self._avoided(state, cost))
        await self.budget.settle(state.req_id, adm, cost, record)
        metrics.settlements.labels(source).inc()
        metrics.cost_per_request.labels(self.model_label(state.model, state.price),
                                        state.route.backend_type).observe(usd_float(cost))
