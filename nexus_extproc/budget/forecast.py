"""Spend forecasts: where a budget's period will end, and when its limit will be reached.

Method (documented in docs/budgets.md): the period-average spend rate, rate = settled / elapsed, where elapsed
is at least one hour so the first minutes of a period do not extrapolate wildly; projected end-of-period spend
= settled + rate × remaining; exhaustion = now + (limit − settled) / rate, reported only if it falls inside the
period. Simple and explainable: no model, no hidden state.
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_ELAPSED_S = 3600.0


@dataclass(frozen=True, slots=True)
class Forecast:
    projected_micros: int
    exhaustion_in_s: float | None  # None: not reached this period; 0: already reached

    def exceeds(self, limit_micros: int) -> bool:
        return self.projected_micros > limit_micros


def forecast(settled_micros: int, limit_micros: int, start: float, end: float, now: float) -> Forecast:
    now = min(max(now, start), end)
    elapsed = max(now - start, MIN_ELAPSED_S)
    rate = settled_micros / elapsed
    projected = settled_micros + rate * (end - now)
    if settled_micros >= limit_micros:
        return Forecast(round(projected), 0.0)
    if rate <= 0:
        return Forecast(round(projected), None)
    eta = (limit_micros - settled_micros) / rate
    return Forecast(round(projected), eta if now + eta <= end else None)
