"""Budget periods. Calendar ones on the calendar of a timezone (UTC by default): a month is a calendar month,
never 30 days (LiteLLM #9098); a week is the ISO week, Monday 00:00; an hour is the zone's hour. Short fixed
windows (`every: 10m`) are aligned to the Unix epoch. A rolling window (`rolling: 1h`) is the last N, kept as
`ROLLING_BUCKETS` fixed buckets (ledger.base.window_of): the bound on its error is one bucket, N/12 (a spend
leaves the window between 11/12 N and N after it was reserved)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal, cast
from zoneinfo import ZoneInfo

from nexus_extproc.ledger.base import ROLLING_BUCKETS, rolling_key
from nexus_extproc.terms import duration_s

PeriodKind = Literal["daily", "weekly", "monthly", "hourly", "every", "rolling"]
CALENDAR = ("daily", "weekly", "monthly")


@dataclass(frozen=True, slots=True)
class PeriodRule:
    kind: PeriodKind
    seconds: int = 0  # every / rolling: the window's length
    text: str = ""  # as configured: "monthly", "hourly", "every 10m", "rolling 1h"

    @classmethod
    def of(cls, value: object) -> PeriodRule:
        """From the config's `period`: a name, or a model / mapping with `rolling` or `every`."""
        if isinstance(value, PeriodRule):
            return value
        if isinstance(value, str):
            if value not in (*CALENDAR, "hourly"):
                raise ValueError(f"unknown period {value!r}")
            return cls(cast(PeriodKind, value), 3600 if value == "hourly" else 0, value)
        doc = value if isinstance(value, dict) else getattr(value, "model_dump", lambda: {})()
        kind: PeriodKind
        for kind in ("rolling", "every"):
            if doc.get(kind):
                return cls(kind, duration_s(doc[kind]), f"{kind} {doc[kind]}")
        raise ValueError(f"unknown period {value!r}")

    @property
    def short(self) -> bool:
        """A window that frees up within minutes or hours: its refusal is a 429 a client may wait out, not the
        calendar budgets' 503."""
        return self.kind not in CALENDAR

    def config_value(self) -> object:
        return {self.kind: self.text.split(" ", 1)[1]} if self.kind in ("rolling", "every") else self.kind


def period_value(text: str) -> object:
    """The config's `period` from its one-line form, as the admin API and the CLI take it: "monthly", "hourly",
    "rolling 1h" (or "rolling:1h"), "every 10m"."""
    t = text.strip()
    for kind in ("rolling", "every"):
        if t.startswith(kind) and t[len(kind):len(kind) + 1] in (" ", ":"):
            return {kind: t[len(kind) + 1:].strip()}
    return t


@dataclass(frozen=True, slots=True)
class Period:
    key: str  # "2026-11", "2026-W48", "2026-11-23", a bucket's key: the store's key for this period's totals
    start: datetime
    end: datetime  # exclusive: the reset instant (a rolling window: when its oldest bucket leaves)
    # What an alert fires once per, when not the key: a rolling window's buckets change every N/12, and its
    # alerts fire at most once per window length (the window's N-aligned block).
    dedupe: str = ""

    @property
    def alert_key(self) -> str:
        return self.dedupe or self.key

    def seconds_until_reset(self, now: datetime) -> int:
        return max(0, int((self.end - now).total_seconds() + 0.999))


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def period_for(kind: PeriodKind | PeriodRule | object, now: datetime, tz: ZoneInfo | None = None) -> Period:
    rule = PeriodRule.of(kind)
    if rule.kind == "every":
        n = int(now.timestamp()) // rule.seconds
        return Period(f"E{rule.seconds}:{n:012d}", _utc(n * rule.seconds), _utc((n + 1) * rule.seconds))
    if rule.kind == "rolling":
        width = rule.seconds // ROLLING_BUCKETS
        n = int(now.timestamp()) // width
        edge = (n + 1) * width
        return Period(rolling_key(width, ROLLING_BUCKETS, n), _utc(edge - rule.seconds), _utc(edge),
                      f"R{width}x{ROLLING_BUCKETS}:w{n // ROLLING_BUCKETS}")
    local = now.astimezone(tz or UTC)
    if rule.kind == "hourly":
        start = local.replace(minute=0, second=0, microsecond=0).astimezone(UTC)
        return Period(start.strftime("%Y-%m-%dT%H:%MZ"), start, start + timedelta(hours=1))
    day = datetime(local.year, local.month, local.day, tzinfo=local.tzinfo)
    if rule.kind == "daily":
        start, end = day, day + timedelta(days=1)
        key = f"{local.year:04d}-{local.month:02d}-{local.day:02d}"
    elif rule.kind == "weekly":
        start = day - timedelta(days=local.weekday())
        end = start + timedelta(days=7)
        iso = local.isocalendar()
        key = f"{iso.year:04d}-W{iso.week:02d}"
    else:
        start = datetime(local.year, local.month, 1, tzinfo=local.tzinfo)
        end = datetime(local.year + (local.month == 12), local.month % 12 + 1, 1, tzinfo=local.tzinfo)
        key = f"{local.year:04d}-{local.month:02d}"
    # Wall-clock boundaries in the budget's zone, then back to UTC (DST days are 23 or 25 hours long).
    tzinfo = tz or UTC
    start = start.replace(tzinfo=None).replace(tzinfo=tzinfo).astimezone(UTC)
    end = end.replace(tzinfo=None).replace(tzinfo=tzinfo).astimezone(UTC)
    return Period(key, start, end)


def seconds_until_room(rule: PeriodRule, period: Period, buckets: Sequence[tuple[int, int]], need: int,
                       now: datetime) -> int:
    """A rolling window over its limit by `need`: how long until enough of its spend ages out (bucket by bucket,
    oldest first; `buckets` are (settled, reserved) as ledger.buckets returns them). Past the whole window,
    the window's length."""
    width = rule.seconds // ROLLING_BUCKETS
    end = period.end.timestamp()
    freed = 0
    for k, (settled, reserved) in enumerate(buckets[:-1]):
        freed += settled + reserved
        if freed >= need:
            # bucket k (oldest = 0) leaves the window at the k-th bucket boundary from now
            return max(1, int(end + k * width - now.timestamp() + 0.999))
    return max(1, int(end + (len(buckets) - 1) * width - now.timestamp() + 0.999))
