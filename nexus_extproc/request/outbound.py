"""The response side: the cost headers, then the body, read for usage (JSON or SSE)."""

from __future__ import annotations

import json
import logging

from nexus_extproc.apis.content_encoding import DecodeError, decoder_for
from nexus_extproc.apis.sse import SSEParser
from nexus_extproc.ops import metrics
from nexus_extproc.request.reports import Reports
from nexus_extproc.request.state import MAX_STREAM_TEXT, Reply, RequestState

log = logging.getLogger(__name__)
_ENCODINGS = ("gzip", "deflate", "br", "zstd")


class Outbound(Reports):
    """The response phases: cost headers, then the body (JSON usage or the SSE stream)."""

    def response_headers(self, state: RequestState, headers: dict[str, str]) -> Reply:
        """ext_proc phase `response_headers`, where Envoy sends them (the mesh integrations do; envoy/nexus.yaml
        skips the exchange, adding the X-Nexus-* headers from the request phase's metadata instead): add the
        headers; stream SSE bodies instead of buffering them."""
        try:
            state.response_status = int(headers.get(":status", "0"))
        except ValueError:
            state.response_status = 0
        state.response_started = True
        reply = Reply()
        if state.route is None:
            return reply
        reply.set_headers = self._nexus_headers(state)
        if state.envoy_settles and state.forwarded and not state.server_hides_usage and state.admission is not None:
            # server.settlement: envoy where the response headers come here (the mesh integrations): the body
            # goes past the server, and Envoy's filters report its usage as they do in envoy/nexus.yaml.
            state.envoy_reads = reply.envoy_reads_body = True
            return reply
        self._content_encoding(state, headers.get("content-encoding", ""))
        if "text/event-stream" in headers.get("content-type", ""):
            state.streaming = True
            state.sse = SSEParser()
            reply.stream_response_body = True
            reply.remove_headers.append("content-length")
        return reply

    def _content_encoding(self, state: RequestState, encoding: str) -> None:
        """A compressed response is read through a decoder (apis/content_encoding.py); one we cannot read is
        counted and settles from our counts. The client's bytes are never touched either way."""
        encoding = encoding.strip().lower()
        if encoding in ("", "identity"):
            return
        state.decoder = decoder_for(encoding)
        if state.decoder is None:
            self._undecoded(state, encoding)

    def _undecoded(self, state: RequestState, encoding: str) -> None:
        state.undecoded, state.decoder = True, None
        label = encoding if encoding in _ENCODINGS else "other"
        metrics.responses_undecoded.labels(label).inc()
        log.warning("response not readable; settling from our counts", extra={"encoding": label})

    def response_start(self, state: RequestState, status: int, encoding: str = "") -> None:
        """The response's first body message when its headers were not sent to us: the status and the
        content-encoding come as attributes, the shape from the request (Envoy's route already picked STREAMED
        for a stream request, BUFFERED otherwise)."""
        state.response_status = status
        state.response_started = True
        self._content_encoding(state, encoding)
        if state.parsed is not None and state.parsed.stream and status < 400:
            state.streaming = True
            state.sse = SSEParser()

    def response_body(self, state: RequestState, chunk: bytes, end_of_stream: bool) -> Reply:
        """ext_proc phase `response_body`: BUFFERED for JSON (one message), STREAMED for SSE (per chunk)."""
        reply = Reply()
        tr = state.translator
        if tr is None or state.route is None:
            return reply
        raw = chunk
        if state.decoder is not None:
            try:
                chunk = state.decoder.feed(chunk)
            except DecodeError:
                self._undecoded(state, "broken")
        if state.undecoded:
            if end_of_stream:
                state.response_complete = True
                reply.metadata = self._final_metadata(state)
            return reply
        if state.streaming and state.sse is not None:
            events = state.sse.feed(chunk)
            if end_of_stream:
                events += state.sse.flush()
            keep: list[bytes] = []
            was_final, done = state.usage_final, False
            for ev in events:
                drop = False
                done = done or ev.data == "[DONE]"
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
                        drop = info.usage_only and state.server_hides_usage
                keep.append(b"" if drop else ev.raw)
            if state.server_hides_usage and raw is chunk:
                # Only whole events go out (a partial one waits in the parser), so an unrequested usage
                # chunk can be removed whole and the client sees exactly the stream it asked for. (Such a
                # request asks for identity; a provider that compresses anyway keeps its bytes unedited.)
                out = b"".join(keep)
                if out != chunk:
                    reply.body = out
            if not end_of_stream and (done or state.usage_final > was_final):
                # The client may hang up as soon as it reads the last event, before the stream's end reaches
                # us: the access log's cost must not wait for end_of_stream.
                reply.metadata = self._final_metadata(state)
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
