"""Only Envoy may talk to the gRPC edge: a shared secret in each stream's initial metadata.

The access-log stream is an input to settlement, and a client that learns its own X-Nexus-Request-Id could
otherwise report 0 tokens for its most expensive request; the ext_proc stream decides what is admitted. Envoy
sets the secret on its `grpc_service` (`initial_metadata`); health checks stay open (they decide nothing).
"""

from __future__ import annotations

import hmac

import grpc

from nexus_extproc.ops import metrics

TOKEN_METADATA = "x-nexus-envoy-token"
# What an Envoy that reads responses itself (settlement filters and the access log) says on its ext_proc stream.
SETTLEMENT_METADATA = "x-nexus-settlement"


# ... and what one whose Lua filter hides the usage chunk the server asks for says (envoy/lua/hide_usage.lua).
USAGE_HIDDEN_METADATA = "x-nexus-usage-hidden-by"


def envoy_declarations(context: grpc.aio.ServicerContext) -> tuple[bool, bool]:
    """(Envoy reads responses itself, Envoy hides the added usage chunk), from the stream's initial metadata."""
    settles = hides = False
    for k, v in context.invocation_metadata() or ():
        if k == SETTLEMENT_METADATA and v == "envoy":
            settles = True
        elif k == USAGE_HIDDEN_METADATA and v == "envoy":
            hides = True
    return settles, hides


class PeerCheck:
    def __init__(self, token: str | None) -> None:
        self._token = token.encode() if token else None

    async def allow(self, context: grpc.aio.ServicerContext, service: str) -> bool:
        """True when no token is configured or the stream carries it; otherwise the stream is aborted."""
        if self._token is None:
            return True
        sent = next((v for k, v in (context.invocation_metadata() or ()) if k == TOKEN_METADATA), "")
        sent_b = sent.encode() if isinstance(sent, str) else bytes(sent)
        if hmac.compare_digest(sent_b, self._token):
            return True
        metrics.unauthenticated_streams.labels(service).inc()
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "this stream must come from the configured Envoy")
        return False
