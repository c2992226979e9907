"""Which budgets a request falls under: pure matching of request facts against budget scopes."""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import re
from dataclasses import dataclass

from nexus_extproc.config import ScopeConfig


@dataclass(frozen=True, slots=True)
class RequestFacts:
    model: str
    backend_type: str
    api_key_hash: str | None = None
    user: str | None = None
    team: str | None = None
    agent: str | None = None
    tool: str | None = None
    session: str | None = None


def hash_api_key(key: str, salt: bytes) -> str:
    """Budgets name API keys only by this salted hash; the key itself is never stored or logged."""
    return "hmac-sha256:" + hmac.new(salt, key.encode(), hashlib.sha256).hexdigest()


def api_key_of(headers: dict[str, str]) -> str | None:
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return headers.get("x-api-key") or headers.get("api-key") or None


def matches(scope: ScopeConfig | None, facts: RequestFacts) -> bool:
    if scope is None:
        return True
    if scope.model is not None and not fnmatch.fnmatchcase(facts.model, scope.model):
        return False
    if scope.backend_type is not None and scope.backend_type != facts.backend_type:
        return False
    if scope.api_key_hash is not None and (facts.api_key_hash is None or not hmac.compare_digest(
            scope.api_key_hash, facts.api_key_hash)):
        return False
    return all(want is None or want == got or (want == "*" and bool(got))
               for want, got in ((scope.user, facts.user), (scope.team, facts.team), (scope.agent, facts.agent),
                                 (scope.tool, facts.tool), (scope.session, facts.session)))


def model_allowed(globs: list[str] | None, model: str) -> bool:
    return globs is None or any(fnmatch.fnmatchcase(model, g) for g in globs)


DISTINCT_DIMS = ("user", "team", "agent", "tool", "session")
_SAFE_VALUE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")


def distinct_dims(scope: ScopeConfig | None) -> tuple[str, ...]:
    return () if scope is None else tuple(k for k in DISTINCT_DIMS if getattr(scope, k) == "*")


def instance_name(parent: str, dims: tuple[str, ...], facts: RequestFacts) -> str:
    """`parent/value` (values joined by '+' for several dimensions). A value outside a small character set is
    named by a hash of it: instance names go into ledger keys and reports, never raw header text."""
    return f"{parent}/{'+'.join(safe_value(getattr(facts, k) or '') for k in dims)}"


def safe_value(v: str) -> str:
    """A header value as it may appear in names, alerts and reports: itself within a small character set and
    64 characters, else `h-` and 16 hex digits of its hash."""
    return v if _SAFE_VALUE.fullmatch(v) else "h-" + hashlib.sha256(v.encode()).hexdigest()[:16]


def overflow_name(parent: str) -> str:
    return f"{parent}/_other"
