"""What settling a request needs, carried in its own dynamic metadata (server.settlement: envoy).

Envoy's access log goes to whichever server process its gRPC stream reaches: another pod behind a Service (Istio,
Envoy Gateway, several replicas), or another worker. So a report must be settleable by any process, not only by
the one whose ext_proc stream admitted the request. The request phase writes this snapshot into
`nexus.extproc:settle`; Envoy hands it back with the usage, and `restore` rebuilds the few fields the settlement
reads. Labels, counts and the reservation's keys only: no prompt text, no credentials. Only Envoy can write that
namespace (ext_proc's `receiving_namespaces`), and only an authenticated Envoy can send the report.
"""

from __future__ import annotations

import json
from typing import Any

from nexus_extproc.apis import ParsedRequest, for_path
from nexus_extproc.apis.errors import NexusError
from nexus_extproc.budget.policy import Action, Decision
from nexus_extproc.budget.service import Admission
from nexus_extproc.metering.pricing import PriceBook
from nexus_extproc.metering.tokenizers import PromptShape
from nexus_extproc.request.router import Router
from nexus_extproc.request.state import RequestState

SNAPSHOT_KEY = "settle"
_VERSION = 1
_MAX_LEN = 8192  # a snapshot is a few hundred bytes; anything larger is not one of ours


def snapshot(state: RequestState) -> str | None:
    adm, route, parsed, tr = state.admission, state.route, state.parsed, state.translator
    if adm is None or not adm.items or route is None or parsed is None or tr is None or state.model is None:
        return None
    doc: dict[str, Any] = {
        "v": _VERSION, "p": tr.path, "s": parsed.stream, "b": route.backend, "m": state.model,
        "q": parsed.model or "", "k": [list(k) for k in adm.items], "e": state.estimate,
        "pt": state.prompt_tokens, "pe": state.prompt_estimate, "tc": state.tool_calls, "eo": state.expected_output,
        "tk": state.task, "tg": state.tags, "tl": state.tool, "ss": state.session,
        "tm": state.identity.get("team", ""), "ag": state.identity.get("agent", ""),
    }
    if state.asked_price is not None:  # rerouted: the asked model's price, for the saving it records
        doc["r"] = 1
    if adm.outbox:
        doc["o"] = 1
    return json.dumps(doc, separators=(",", ":"))


def restore(text: Any, req_id: str, router: Router, prices: PriceBook) -> RequestState | None:
    """The request as settlement sees it; None for anything that is not a snapshot this version wrote."""
    if not isinstance(text, str) or len(text) > _MAX_LEN:
        return None
    try:
        d = json.loads(text)
        if not isinstance(d, dict) or d.get("v") != _VERSION:
            return None
        tr = for_path(str(d["p"]))
        route = router.by_name(str(d["b"]))
        if tr is None or route is None:
            return None
        model, asked = str(d["m"]), str(d["q"])
        items = tuple((str(b), str(p)) for b, p in d["k"])
        st = RequestState(req_id=req_id, path=tr.path, family=tr.family, translator=tr, route=route, model=model,
                          price=prices.resolve(route.price_provider, model),
                          asked_price=prices.resolve(router.route(tr.family, asked).price_provider, asked)
                          if d.get("r") else None,
                          parsed=ParsedRequest(doc={}, model=asked, stream=bool(d["s"]), max_output_tokens=None,
                                               shape=PromptShape(messages=())),
                          prompt_tokens=int(d["pt"]), prompt_estimate=int(d["pe"]), tool_calls=int(d["tc"]),
                          expected_output=int(d["eo"]), estimate=int(d["e"]), task=str(d["tk"]), tags=str(d["tg"]),
                          tool=str(d["tl"]), session=str(d["ss"]), forwarded=True, counted=True, estimated=True)
        st.identity = {k: v for k, v in (("team", str(d["tm"])), ("agent", str(d["ag"]))) if v}
        st.admission = Admission(Decision(Action.ALLOW, None, "Normal"), None, items, st.estimate,
                                 outbox=bool(d.get("o")))
        return st
    except (KeyError, TypeError, ValueError, NexusError):
        return None
