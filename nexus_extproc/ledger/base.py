"""The ledger interface both stores implement and one test suite checks.

Amounts are integer micro-dollars. A request reserves its estimate against every budget it falls under,
all or nothing, and later settles to its actual cost (or releases). Settlement is keyed by a server-made
request id and idempotent, so a retried settle never charges twice; reservations carry an expiry so a
crashed process cannot pin budget forever.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple


class StoreUnavailable(Exception):
    """The store did not answer in time or refused: the caller applies `store_failure`."""


class StoreOpenError(RuntimeError):
    """The store cannot be opened at all (a missing or read-only directory, a bad URL): a start-up error with
    one line naming what failed, not a traceback."""


class Totals(NamedTuple):
    """A NamedTuple, not a frozen dataclass: several are made per request per budget (a frozen dataclass's
    __init__ runs ~25 bytecodes, this ~5)."""

    settled: int
    reserved: int


Key = tuple[str, str]  # (budget name, period key)

# A rolling window's period key names its current bucket: `R{width}x{count}:{index}` is bucket `index` (unix
# seconds // width, zero-padded so keys sort by time) of a window of `count` buckets of `width` seconds. A store
# writes to that bucket alone, but the totals it returns for such a key, and the cap it checks, are the sums of
# the window's `count` buckets (the current one and the `count - 1` before it).
ROLLING_BUCKETS = 12


# A token budget's period key starts with `T:` (`T:2026-12`, `T:R300x12:…`): its amounts are tokens, not
# micro-dollars. It reserves the request's token estimate (`reserve(tokens=…)`), and settles (or is charged by the
# reaper, or corrected) in the record's tokens, input plus output, where a dollar key settles in the cost.
TOKENS = "T:"


def rolling_key(width_s: int, count: int, index: int) -> str:
    return f"R{width_s}x{count}:{index:012d}"


def window_of(period: str) -> tuple[str, list[str]] | None:
    """For a rolling key: (the prefix its buckets share, the period keys of the window's older buckets, oldest
    first); None for any other period key."""
    unit = TOKENS if period.startswith(TOKENS) else ""
    bare = period[len(unit):]
    if not bare.startswith("R"):
        return None
    head, _, index = bare.partition(":")
    count = int(head.partition("x")[2])
    i = int(index)
    return unit + head, [f"{unit}{head}:{j:012d}" for j in range(i - count + 1, i)]


def record_tokens(record: SpendRecord) -> int:
    """What a token budget counts of a settlement."""
    return record.input_tokens + record.output_tokens


@dataclass(frozen=True, slots=True)
class SpendRecord:
    """What a settlement leaves behind for reports: no prompt text, no identities."""

    ts: float
    model: str
    backend: str
    input_tokens: int
    output_tokens: int
    estimate: int
    source: str  # "usage" | "estimated" | "released"
    avoided: int = 0  # rerouted: what the asked-for cloud model would have cost for the same usage, minus cost
    # The model the client asked for; `model` is the one settled at (the answering model, or a reroute's target).
    model_requested: str = ""
    # Attribution from the trusted x-nexus-task / x-nexus-tags headers ("" when absent); tags are the
    # normalised comma list (sorted, unique), so reports can split them again.
    task: str = ""
    tags: str = ""
    team: str = ""  # the trusted x-nexus-team (FOCUS SubAccountId)
    agent: str = ""  # the trusted x-nexus-agent
    tool: str = ""  # the client tool's label (claude-code, codex, openai-python, ..., other)
    session: str = ""  # the client's own session id, hashed
    cache_read_tokens: int = 0  # of input_tokens, read from the provider's prompt cache
    output_reserved: int = 0  # output tokens the estimate reserved for (max_tokens, or the model's expectation)
    streamed: bool = False


@dataclass(frozen=True, slots=True)
class AuditRecord:
    ts: float
    actor: str
    budget: str
    field: str
    old: str
    new: str


@dataclass(frozen=True, slots=True)
class SpendAgg:
    """Settled spend at the finest grain the reports need: budget × model × UTC day."""

    budget: str
    model: str
    day: str
    requests: int
    input_tokens: int
    output_tokens: int
    cost: int
    estimate: int
    avoided: int = 0
    model_requested: str = ""
    reaped: int = 0  # of `cost`, what the reaper charged at the estimate (the process died, no usage seen)
    backend: str = ""
    task: str = ""
    tags: str = ""
    cache_read_tokens: int = 0
    output_reserved: int = 0
    streamed: int = 0  # how many of `requests` were streamed (SSE)
    team: str = ""
    agent: str = ""
    tool: str = ""
    session: str = ""


class PruneResult(NamedTuple):
    """What one retention pass removed."""

    days_rolled_up: int = 0  # whole UTC days of settlements folded into daily aggregates
    settlements: int = 0  # settlement rows (or log entries) deleted after their day was rolled up
    alerts: int = 0  # alert history entries deleted
    buckets: int = 0  # totals rows of short windows long out of their window


def old_window_key(period: str, now: float, keep_s: float) -> bool:
    """A short window's bucket (rolling `R…`, `every` `E…`) that ended more than `keep_s` before `now`."""
    period = period.removeprefix(TOKENS)
    try:
        if period.startswith("R"):
            head, _, index = period.partition(":")
            width, count = (int(x) for x in head[1:].split("x"))
            return (int(index) + count) * width < now - keep_s
        if period.startswith("E"):
            secs, _, index = period[1:].partition(":")
            return (int(index) + 1) * int(secs) < now - keep_s
    except ValueError:
        return False
    return False


class ReapResult(NamedTuple):
    """What one reaper pass did with expired reservations."""

    released: int = 0  # never forwarded upstream: nothing was billed, the hold is dropped
    charged: int = 0  # forwarded, then its process died: settled at the reserved estimate (source "reaped")
    charged_micros: int = 0


@dataclass(frozen=True, slots=True)
class ForwardNote:
    """What a reaped settlement records about a request whose process died: labels and counts, no text."""

    model: str
    backend: str
    model_requested: str
    input_tokens: int
    task: str = ""
    tags: str = ""

    def pack(self) -> str:
        return f"{self.model}\t{self.backend}\t{self.model_requested}\t{self.input_tokens}\t{self.task}\t{self.tags}"

    @classmethod
    def unpack(cls, text: str | None) -> ForwardNote:
        parts = (text or "").split("\t")
        if len(parts) not in (4, 6) or not parts[3].isdigit():  # 4: written before task and tags existed
            return cls("other", "unknown", "other", 0)
        return cls(parts[0], parts[1], parts[2], int(parts[3]), *parts[4:6])


@dataclass(frozen=True, slots=True)
class ReserveResult:
    admitted: bool
    totals: list[Totals]  # per item, after the reservation (or as seen when refused)


# Calibration sums, decayed: (provider input tokens, our count, server-tool calls, samples, last update ts).
CalibrationSums = tuple[float, float, float, float]


def decay(sums: CalibrationSums, age_s: float, half_life_s: float) -> CalibrationSums:
    """Exponential time decay: old samples fade, but the ratio of the sums (what is applied) does not move
    until new samples arrive."""
    f = 0.5 ** (max(0.0, age_s) / half_life_s)
    return (sums[0] * f, sums[1] * f, sums[2] * f, sums[3] * f)


class SpendLedger(abc.ABC):
    """The part a request needs: reserve, settle, release, reap, and the once-only period marker. A new store
    (Postgres, say) starts here; the other contracts add the admin API, reports and shared calibration."""

    @abc.abstractmethod
    async def totals(self, budget: str, period: str) -> Totals:
        """The key's totals; for a rolling key (`window_of`), its window's."""

    @abc.abstractmethod
    async def buckets(self, budget: str, period: str) -> list[Totals]:
        """A rolling key's window bucket by bucket, oldest first, the current one last (when spend ages out);
        [totals] for any other key."""

    @abc.abstractmethod
    async def reserve(self, req_id: str, keys: Sequence[Key], amount: int, expires_at: float,
                      caps: Sequence[int | None] | None = None,
                      forwarded: tuple[float, ForwardNote] | None = None, tokens: int = 0) -> ReserveResult:
        """Reserve `amount` in every budget of `keys`, all or nothing: refused (nothing reserved) if any budget
        would pass its cap (caps[i] for keys[i]; None: no cap). One amount for all: a request costs the same
        whichever budgets count it; a token budget's key (`TOKENS`) holds `tokens` instead. Callers on the hot
        path pass the same tuple object per budget set.
        `forwarded` writes the reservation already marked as `mark_forwarded` would, in the same write: the
        request path's one ledger write (a process that dies before sending it charges its estimate)."""

    @abc.abstractmethod
    async def settle(self, req_id: str, keys: Sequence[Key], cost: int, record: SpendRecord) -> bool:
        """Replace the request's reservations with `cost`; False if this id was already settled. A settlement
        at the estimate (`record.source == "estimate"`: no usage report came in time) applies only while the
        request is still reserved: another process may have settled it from the report, or released it."""

    @abc.abstractmethod
    async def correct(self, req_id: str, keys: Sequence[Key], cost: int, record: SpendRecord) -> bool:
        """Replace a settlement made at the estimate (source "estimate": its usage report came late) with the
        real `cost` and `record`, moving each budget's settled total by the difference; once: False when the
        request's settlement is not an estimate (none, exact, or corrected already)."""

    @abc.abstractmethod
    async def release(self, req_id: str) -> int:
        """Drop the request's reservations unsettled; returns how many were dropped."""

    @abc.abstractmethod
    async def mark_forwarded(self, req_id: str, at: float, note: ForwardNote) -> None:
        """The request went upstream: from now on the provider may bill it, so a reaper must charge it rather
        than release it. A no-op when the reservation is already settled or released."""

    @abc.abstractmethod
    async def reap(self, now: float) -> ReapResult:
        """Reservations past their expiry (left by a crashed or stalled process): charged at the reserved amount
        when forwarded (a settlement with source "reaped"), released when not."""

    @abc.abstractmethod
    async def first_seen(self, budget: str, period: str, now: float) -> bool:
        """True for exactly one caller across every process: drives the once-only rollover event."""

    @abc.abstractmethod
    async def close(self) -> None: ...


class ControlStore(abc.ABC):
    """Runtime settings, their audit trail and small metadata, shared by every replica."""

    @abc.abstractmethod
    async def set_meta(self, key: str, value: str) -> None: ...

    @abc.abstractmethod
    async def get_meta(self, key: str) -> str | None: ...

    @abc.abstractmethod
    async def get_settings(self, budget: str) -> dict[str, object] | None:
        """Runtime overrides of a budget's config (limit, thresholds, temporary raise), if any."""

    @abc.abstractmethod
    async def put_settings(self, budget: str, settings: dict[str, object] | None,
                           audit: list[AuditRecord]) -> None:
        """Store new settings (None: drop them, so the config applies again) and their audit records in one
        step."""

    @abc.abstractmethod
    async def audit_log(self, limit: int) -> list[AuditRecord]: ...

    @abc.abstractmethod
    async def append_audit(self, audit: list[AuditRecord]) -> None:
        """Audit records of a change that is not a settings document (an acknowledged alert)."""


@dataclass(frozen=True, slots=True)
class AlertRecord:
    """One alert as sent: what crossed, the delivery's outcome, and who acknowledged it."""

    id: int
    ts: float
    budget: str
    period: str
    threshold: str  # a percentage ("80") or "forecast"
    spend_micros: int
    limit_micros: int
    delivery: str = "pending"  # pending | delivered | failed | dropped | no_webhook
    attempts: int = 0
    acked_by: str | None = None
    acked_at: float | None = None


class AlertLog(abc.ABC):
    """Every alert fired, shared by every replica: history, delivery outcome, acknowledgement."""

    @abc.abstractmethod
    async def record_alert(self, ts: float, budget: str, period: str, threshold: str, spend_micros: int,
                           limit_micros: int) -> int:
        """Store a new alert (delivery pending); returns its id."""

    @abc.abstractmethod
    async def alert_delivered(self, alert_id: int, delivery: str, attempts: int) -> None: ...

    @abc.abstractmethod
    async def list_alerts(self, limit: int) -> list[AlertRecord]:
        """Newest first."""

    @abc.abstractmethod
    async def ack_alert(self, alert_id: int, actor: str, at: float) -> AlertRecord | None:
        """Acknowledge (the first acknowledgement stands); None for an unknown id."""

    @abc.abstractmethod
    async def all_settings(self) -> dict[str, dict[str, object]]:
        """Every budget's runtime document in one read (settings, and runtime-created definitions)."""


class InstanceIndex(abc.ABC):
    """The instances of a budget per distinct value (`scope: {team: "*"}`), per period, with a bound."""

    @abc.abstractmethod
    async def claim_instance(self, parent: str, period: str, name: str, max_instances: int,
                             idle_ttl_s: int = 0) -> bool:
        """Atomically: True if `name` is (now) one of `parent`'s instances in `period`; False when it is new
        and `parent` already has `max_instances` (the caller then counts the request elsewhere). With
        `idle_ttl_s`, a claim also marks the instance used now (store clock), and instances not claimed within
        the TTL leave the index: they no longer count toward the bound."""

    @abc.abstractmethod
    async def instances(self, parent: str, period: str) -> list[tuple[str, Totals]]:
        """Every instance of `parent` in `period`, with its totals."""


class SpendLog(abc.ABC):
    """The settlements as a log, for reports."""

    @abc.abstractmethod
    async def spend(self, start_ts: float, end_ts: float, per_budget: bool = True) -> list[SpendAgg]:
        """Aggregates at the finest grain reports need. per_budget: one row set per budget a settlement counted
        against (budget reports); otherwise each settlement once, budget "" (exports that must not double
        count, and spend no budget matched)."""

    @abc.abstractmethod
    async def settlement_count(self) -> int: ...

    @abc.abstractmethod
    async def prune(self, settlements_before: float, alerts_before: float, now: float) -> PruneResult:
        """Retention: fold every whole UTC day of settlements before `settlements_before`'s day into daily
        aggregates (what `spend` returns for those days from then on, unchanged at its grain), then delete them;
        delete alert history before `alerts_before`; drop short-window buckets two days out of their window."""


class CalibrationStore(abc.ABC):
    """The estimate ratios every replica learns together."""

    @abc.abstractmethod
    async def merge_calibration(self, deltas: dict[str, CalibrationSums], now: float,
                                half_life_s: float) -> dict[str, CalibrationSums]:
        """Add this replica's new samples to the shared, decayed sums in one atomic step, and return every key's
        sums as now stored (all replicas' samples). An empty `deltas` only reads."""

    @abc.abstractmethod
    async def reset_calibration(self) -> int:
        """Forget every learned estimate ratio; returns how many keys were dropped."""


class Ledger(SpendLedger, ControlStore, SpendLog, CalibrationStore, AlertLog, InstanceIndex):
    """Everything the shipped stores (SQLite, Redis) provide; the service takes this."""
