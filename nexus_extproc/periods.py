"""Budget periods on the UTC calendar: a month is a calendar month, never 30 days (LiteLLM #9098)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Literal

PeriodKind = Literal["monthly"]


@dataclass(frozen=True, slots=True)
class Period:
    key: str  # "2026-11": the store's key for this period's totals
    start: datetime
    end: datetime  # exclusive: the reset instant

    def seconds_until_reset(self, now: datetime) -> int:
        return max(0, int((self.end - now).total_seconds() + 0.999))


def month_period(now: datetime) -> Period:
    now = now.astimezone(UTC)
    start = datetime(now.year, now.month, 1, tzinfo=UTC)
    end = datetime(now.year + (now.month == 12), now.month % 12 + 1, 1, tzinfo=UTC)
    return Period(f"{now.year:04d}-{now.month:02d}", start, end)


def next_reset_date(now: datetime) -> date:
    return month_period(now).end.date()
