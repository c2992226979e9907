"""A budget's forecast from its settled daily spend: 7/30/90 days ahead and to the end of its period, each with
an 80 % interval and the trend (the method is in forecast.py). Days are UTC days; the period end is the
budget's own (its timezone), counted in fractional days from now."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from nexus_extproc.budget.book import Book, BudgetDef
from nexus_extproc.budget.forecast import HISTORY_DAYS, Projection, SeriesForecast, rest_of_period, series_forecast


@dataclass(frozen=True, slots=True)
class BudgetProjection:
    budget: str
    period: str
    limit_micros: int
    settled_micros: int
    series: SeriesForecast
    end_of_period: Projection  # total spend at the period's end: settled so far + the rest
    overrun_likely: bool  # the end-of-period point forecast passes the limit

    def doc(self) -> dict[str, object]:
        def p(x: Projection) -> dict[str, object]:
            return {"days": round(x.days, 3), "point_usd": x.point_micros / 1e6, "low_usd": x.low_micros / 1e6,
                    "high_usd": x.high_micros / 1e6}

        return {"method": "seasonal-linear", "trend": self.series.trend, "history_days": self.series.history_days,
                "slope_usd_per_day": round(self.series.slope_micros_per_day / 1e6, 6),
                "horizons": [p(h) for h in self.series.horizons], "end_of_period": p(self.end_of_period),
                "overrun_likely": self.overrun_likely, "interval": 0.8}


async def _history(book: Book, key: str, today: datetime) -> tuple[list[int], int]:
    """Settled spend per complete UTC day, oldest first, and the first day's weekday. Complete days do not
    change, so the report query runs once per budget per day (it can read months of settlements), not on
    every stats request or reconciler pass."""
    cached = book.history_cache.get((key, today.date().isoformat()))
    if cached is not None:
        return cached
    assert book.ledger is not None
    start = today - timedelta(days=HISTORY_DAYS)
    by_day: dict[str, int] = {}
    for a in await book.ledger.spend(start.timestamp(), today.timestamp()):
        if a.budget == key:
            by_day[a.day] = by_day.get(a.day, 0) + a.cost
    # History starts at the first day with spend (a new budget is not a long run of zeros).
    days = [(start + timedelta(days=i)).date().isoformat() for i in range(HISTORY_DAYS)]
    first = next((i for i, k in enumerate(days) if by_day.get(k)), len(days))
    out = ([by_day.get(k, 0) for k in days[first:]], (start + timedelta(days=first)).weekday())
    if len(book.history_cache) > 10_000:
        book.history_cache.clear()
    book.history_cache[(key, today.date().isoformat())] = out
    return out


async def project(book: Book, d: BudgetDef, name: str | None = None) -> BudgetProjection:
    """`name`: the ledger key the spend is recorded under (a distinct-value instance), default d.name."""
    assert book.ledger is not None
    key = name or d.name
    now = book.clock()
    now = now.astimezone(UTC)
    today = datetime(now.year, now.month, now.day, tzinfo=UTC)
    history, first_weekday = await _history(book, key, today)
    series = series_forecast(history, first_weekday)
    period = d.period(now)
    totals = await book.ledger.totals(key, d.key(period))
    frac = (now - today).total_seconds() / 86400
    end_days = max(0.0, (period.end - now).total_seconds() / 86400)
    rest = rest_of_period(history, first_weekday, frac, end_days)  # no history: zero
    eop = Projection(end_days, totals.settled + rest.point_micros, totals.settled + rest.low_micros,
                     totals.settled + rest.high_micros)
    limit = d.settings.limit_at(time.time())
    return BudgetProjection(key, period.key, limit, totals.settled, series, eop, eop.point_micros > limit)
