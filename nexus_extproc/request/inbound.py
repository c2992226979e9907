"""The request side: headers, then the body (one decision: admit, route, rewrite)."""

from __future__ import annotations

import json
import logging
from datetime import UTC, timedelta
from typing import Any

from nexus_extproc.apis import ParsedRequest, family_for_path, for_path
from nexus_extproc.apis.content_encoding import supported, upstream_accept_encoding
from nexus_extproc.apis.endpoints import Passthrough, family_hint, free_endpoint, is_websocket_upgrade
from nexus_extproc.apis.errors import (
    NexusError,
    bad_request,
    budget_exceeded,
    encoded_body,
    model_not_allowed,
    not_found,
    payload_too_large,
    runaway,
    store_unavailable,
    websocket_not_served,
)
from nexus_extproc.budget.policy import REJECT_MODEL, REJECT_RUNAWAY, Action
from nexus_extproc.budget.scopes import RequestFacts, api_key_of, hash_api_key
from nexus_extproc.budget.service import GLOBAL_BUDGET, BudgetStoreDown
from nexus_extproc.ledger import ForwardNote
from nexus_extproc.metering.money import usd_float
from nexus_extproc.ops import metrics
from nexus_extproc.request import headers as C
from nexus_extproc.request.attribution import BadAttribution, parse_tags, parse_task
from nexus_extproc.request.client_tool import client_session, client_tool
from nexus_extproc.request.estimate import Estimation
from nexus_extproc.request.snapshot import SNAPSHOT_KEY, snapshot
from nexus_extproc.request.state import Reply, RequestState

log = logging.getLogger(__name__)
READABLE = supported()  # once: each check builds a decoder
ENVOY_DECODES = ("gzip", "br", "zstd")


def _has_lone_surrogate(doc: Any) -> bool:
    """JSON allows `\\ud800` alone, Unicode does not: such text cannot be re-encoded or forwarded as UTF-8.
    Only run when the raw body holds a surrogate escape at all."""
    try:
        json.dumps(doc, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return True
    return False


class Inbound(Estimation):
    """The request phases: headers, then the body (parse, count, admit, route, rewrite)."""

    def request_headers(self, state: RequestState, headers: dict[str, str], end_of_stream: bool) -> Reply:
        """ext_proc phase `request_headers`: pick the translator; the decision waits for the body."""
        state.path = headers.get(":path", "")
        state.family = family_for_path(state.path)
        state.envoy_settles = self.settles_in_envoy(state.envoy_declared)
        state.client_nexus_headers = [k for k in headers if k.startswith(C.CLIENT_HEADER_PREFIX)]
        state.accept_encoding = headers.get("accept-encoding")
        state.tool, state.session = client_tool(headers), client_session(headers)
        if self._trust_identity:
            state.identity = {k: headers[h] for k, h in (("user", C.H_USER), ("team", C.H_TEAM), ("agent", C.H_AGENT))
                              if headers.get(h)}
        if self._need_key:
            key = api_key_of(headers)
            state.api_key_hash = hash_api_key(key, self._salt) if key else None
        method = headers.get(":method", "POST")
        if is_websocket_upgrade(headers):
            metrics.websocket_refused.inc()
            return self._error(state, websocket_not_served(), "websocket")
        state.translator = for_path(state.path)
        if state.translator is None:
            free = free_endpoint(method, state.path)
            if free is None and self.config.server.unknown_paths == "pass":
                free = "unknown"
            if free is None:
                return self._error(state, not_found("path not served by the budget filter"), "unknown_path")
            return self._passthrough(state, free, family_hint(state.path, headers) or state.family)
        if self._trust_attribution:
            try:
                state.task = parse_task(headers.get(C.H_TASK))
                state.tags = parse_tags(headers.get(C.H_TAGS))
            except BadAttribution as e:
                return self._error(state, bad_request(str(e)), "bad_attribution")
        if method != "POST" or end_of_stream:
            return self._error(state, bad_request("a JSON request body is required"), "no_body")
        if headers.get("content-encoding", "identity").strip().lower() not in ("identity", ""):
            return self._error(state, encoded_body(), "encoded_body")
        try:
            length = int(headers.get("content-length", "0") or 0)
        except ValueError:
            length = 0
        if length > self.config.server.max_request_body_bytes:
            return self._error(state, payload_too_large(self.config.server.max_request_body_bytes), "too_large")
        # Client-supplied x-nexus-* headers are removed now, so they never reach a route or an upstream.
        return Reply(remove_headers=list(state.client_nexus_headers))

    def _passthrough(self, state: RequestState, endpoint: Passthrough, family: str) -> Reply:
        """Forwarded as it is to the family's cloud backend, uncharged and unread: no body, no response."""
        try:
            route = self.router.route(family, "")
        except NexusError as e:
            return self._error(state, e, "unknown_path")
        metrics.passthrough.labels(endpoint).inc()
        return Reply(set_headers=[(C.UPSTREAM_HEADER, route.cluster)], clear_route_cache=True, passthrough=True,
                     remove_headers=[h for h in state.client_nexus_headers if h != C.UPSTREAM_HEADER])

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
        state.prompt_tokens, state.tier, state.counted = prompt_tokens, tier, True
        expected = self._expected_output(model, parsed, tr)
        state.expected_output = expected
        price = self.prices.resolve(route.price_provider, model)
        adj = self.calibration.adjust(self.model_label(model, price), tier, f"{tr.api}:{parsed.shape.kind}",
                                      prompt_tokens, parsed.shape.server_tools)
        state.prompt_estimate, state.tool_calls = adj.prompt_tokens, adj.tool_calls
        requested, price = self._target(route, model, adj.prompt_tokens, expected, adj.tool_calls)
        if price.source != "unpriced":  # what a refusal shows: the estimate of what was asked
            state.estimate, state.estimated = requested.estimate_micros, True
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
                             state.identity.get("team"), state.identity.get("agent"), state.tool,
                             state.session or None)
        # The reservation goes in already marked forwarded (one write on the request path): what the reaper
        # records if this process dies after the reply, for the request as asked.
        label = self.model_label(model, price)
        note = ForwardNote(label, route.backend, label, prompt_tokens, state.task, state.tags)
        try:
            adm = await self.budget.admit(state.req_id, requested, equivalent, facts, note)
        except BudgetStoreDown:
            metrics.requests_total.labels("rejected").inc()
            return self._error(state, store_unavailable(), "store_unavailable")
        state.admission = adm
        d = adm.decision
        metrics.requests_total.labels(d.action.value).inc()
        if d.action is Action.REJECT:
            log.info("request rejected by budget", extra={"status": d.status,
                                                           "model": self.model_label(model, price)})
            rej = self.budget.rejection(adm)
            if rej.code == REJECT_MODEL:
                return self._error(state, model_not_allowed(rej.budget, model, rej.allowed_models), "model")
            if rej.code == REJECT_RUNAWAY:
                dim = (rej.budget or "runaway:value").partition(":")[2]
                return self._error(state, runaway(dim, max(1, rej.reset_in_s), not rej.short,
                                                  self.config.server.retry_after_max_secs), "runaway")
            named = None if rej.budget == GLOBAL_BUDGET else rej.budget
            reset = self.budget.clock().astimezone(UTC) + timedelta(seconds=rej.reset_in_s)
            reset_at = reset.replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")
            return self._error(state, budget_exceeded(rej.code, named, rej.reset_in_s, reset_at,
                                                      self.config.server.retry_after_max_secs, rej.short), "budget")

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
        # Only a hidden usage chunk means editing the stream's bytes (server.stream_usage).
        state.added_stream_usage = add_usage and self.config.server.stream_usage == "hidden"
        state.server_hides_usage = state.added_stream_usage and not (state.envoy_settles and state.envoy_hides_usage)
        reply = Reply(clear_route_cache=True)
        reply.set_headers.append((C.UPSTREAM_HEADER, state.route.cluster))
        reply.remove_headers = [h for h in state.client_nexus_headers if h != C.UPSTREAM_HEADER]
        # The provider may compress only as the client allows and we can read; a stream whose bytes we edit (the
        # usage chunk added on the client's behalf) comes uncompressed (docs/streaming.md).
        # With server.settlement: envoy, a stream Envoy settles is decoded by Envoy's decompressors (gzip, br, zstd);
        # everything the server reads itself comes uncompressed, since those decompressors would stall ext_proc.
        readable: tuple[str, ...]
        if state.envoy_settles:
            readable = ENVOY_DECODES if parsed.stream else ()
        else:
            readable = READABLE
        accept = None if state.added_stream_usage else upstream_accept_encoding(state.accept_encoding, readable)
        if accept is not None:
            if accept != state.accept_encoding:
                reply.set_headers.append(("accept-encoding", accept))
        elif state.accept_encoding is not None or state.added_stream_usage or state.envoy_settles:
            # Said outright, not left to an absent header (which allows any coding): nothing the client accepts
            # is readable here (a client saying `compress` only must not get gzip), the server edits that stream
            # (it removes the usage chunk it added), or json_to_metadata reads that JSON answer only uncompressed
            # (docs/streaming.md).
            reply.set_headers.append(("accept-encoding", "identity"))
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
            **dict(self._nexus_headers(state)),  # envoy/nexus.yaml's routes add them to the response
        }
        if state.server_hides_usage or not state.envoy_settles:
            reply.metadata["server_reads"] = True  # Envoy's decompressors skip it (nexus_dev/envoy_config.py)
        if state.envoy_settles:
            reply.metadata["worker"] = self.worker  # which process Envoy's report should reach
            reply.metadata["instance"] = self.instance
            snap = snapshot(state)  # and what any other process needs to settle it (request/snapshot.py)
            if snap is not None:
                reply.metadata[SNAPSHOT_KEY] = snap
        if log.isEnabledFor(logging.DEBUG):
            log.debug("decision", extra={"decision": d.action.value, "status": d.status,
                                         "backend": state.route.backend, "tier": tier})
        return reply
