"""Budget periods on the calendar of a timezone (UTC by default): a month is a calendar month, never 30 days
(LiteLLM #9098); a week is the ISO week, Monday 00:00."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

PeriodKind = Literal["daily", "weekly", "monthly"]


@dataclass(frozen=True, slots=True)
class Period:
    key: str  # "2026-11", "2026-W48", "2026-11-23": the store's key for this period's totals
    start: datetime
    end: datetime  # exclusive: the reset instant

    def seconds_until_reset(self, now: datetime) -> int:
        return max(0, int((self.end - now).total_seconds() + 0.999))


def period_for(kind: PeriodKind, now: datetime, tz: ZoneInfo | None = None) -> Period:
    local = now.astimezone(tz or UTC)
    day = datetime(local.year, local.month, local.day, tzinfo=local.tzinfo)
    if kind == "daily":
        start, end = day, day + timedelta(days=1)
        key = f"{local.year:04d}-{local.month:02d}-{local.day:02d}"
    elif kind == "weekly":
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
