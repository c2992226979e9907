"""Spend forecasts: where a budget's period will end, and when its limit will be reached.

Method (documented in docs/budgets.md): the period-average spend rate, rate = settled / elapsed, where elapsed
is at least one hour so the first minutes of a period do not extrapolate wildly; projected end-of-period spend
= settled + rate × remaining; exhaustion = now + (limit − settled) / rate, reported only if it falls inside the
period. Simple and explainable: no model, no hidden state.
"""

from __future__ import annotations

import math
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


# ---- forecasts from the daily spend series (7/30/90 days, end of period), with intervals and a trend -------------
#
# Method (closed form; docs/budgets.md "Forecasts"): the last up to 56 complete UTC days of settled spend.
#  1. Day-of-week indices s_d: the mean ratio of weekday d's spend to the centred 7-day moving average (with at
#     least 14 days; 1 otherwise), so a quiet weekend is not read as a falling trend nor projected as a weekday.
#  2. The deseasonalised series z_t = y_t / s_d gets an ordinary least-squares line a + b·t.
#  3. Day t is projected as s_d · max(0, a + b·t); a horizon's point forecast is the sum over its days.
#  4. Its 80 % interval is ± 1.2816 · sqrt(V), V = Σ (ρ ŷ_t)² + σ² [(Σ s_d)²/m + (Σ s_d (t − t̄))² / Sxx]: the
#     day-to-day noise, proportional to the projected day ŷ_t (ρ², the residuals' variance relative to the line,
#     since spend noise grows with spend), plus the uncertainty of the line itself (σ², the residual variance),
#     which grows with the horizon. The lower bound stops at 0.
#  5. The trend label is the line's slope: increasing or decreasing when it is significant (|t| > 2) and
#     moves the daily level by more than 2 % a week; stable otherwise.
# statsmodels' ETS would do (1)-(4) with more care, at ~40 MB of install for the server image; bench/forecast.py
# backtests this method on synthetic series with a known answer (interval coverage and MAPE).

Z80 = 1.2816
HISTORY_DAYS = 56
HORIZONS = (7, 30, 90)


@dataclass(frozen=True, slots=True)
class Projection:
    days: float
    point_micros: int
    low_micros: int
    high_micros: int


@dataclass(frozen=True, slots=True)
class SeriesForecast:
    history_days: int
    trend: str  # increasing | stable | decreasing
    slope_micros_per_day: float
    seasonal: tuple[float, ...]  # Monday..Sunday indices
    horizons: tuple[Projection, ...]


@dataclass(frozen=True, slots=True)
class _Fit:
    a: float
    b: float
    sigma2: float
    rel2: float  # variance of the residuals relative to the line: noise grows with the level it rides on
    m: int
    t_mean: float
    sxx: float
    seasonal: tuple[float, ...]
    first_weekday: int  # weekday of t = 0


def _fit(daily: list[int], first_weekday: int) -> _Fit:
    n = len(daily)
    mean = sum(daily) / n if n else 0.0
    seasonal = [1.0] * 7
    if n >= 14 and mean > 0:
        # Ratio to the centred 7-day moving average (classical decomposition): a trend does not leak into
        # the indices, as it would if weekdays were compared with the plain mean.
        sums, counts = [0.0] * 7, [0] * 7
        for t in range(3, n - 3):
            ma = sum(daily[t - 3:t + 4]) / 7
            if ma > 0:
                d = (first_weekday + t) % 7
                sums[d] += daily[t] / ma
                counts[d] += 1
        raw = [sums[d] / counts[d] if counts[d] else 1.0 for d in range(7)]
        norm = sum(raw) / 7
        seasonal = [r / norm if norm > 0 else 1.0 for r in raw]
    pts = [(float(t), y / seasonal[(first_weekday + t) % 7]) for t, y in enumerate(daily)
           if seasonal[(first_weekday + t) % 7] > 1e-9]
    m = len(pts)
    if m == 0:
        return _Fit(0.0, 0.0, 0.0, 0.0, 0, 0.0, 1.0, tuple(seasonal), first_weekday)
    t_mean = sum(t for t, _ in pts) / m
    z_mean = sum(z for _, z in pts) / m
    sxx = sum((t - t_mean) ** 2 for t, _ in pts)
    b = sum((t - t_mean) * (z - z_mean) for t, z in pts) / sxx if sxx > 0 else 0.0
    a = z_mean - b * t_mean
    resid = [z - (a + b * t) for t, z in pts]
    sigma2 = sum(r * r for r in resid) / (m - 2) if m > 2 else (z_mean * 0.5) ** 2
    fitted = [max(a + b * t, 1e-9) for t, _ in pts]
    rel2 = (sum((r / y) ** 2 for r, y in zip(resid, fitted, strict=True)) / (m - 2)) if m > 2 else 0.25
    return _Fit(a, b, sigma2, rel2, m, t_mean, sxx if sxx > 0 else 1.0, tuple(seasonal), first_weekday)


def _project(f: _Fit, start_t: float, days: float) -> Projection:
    """Days start_t .. start_t + days (fractional first and last days count by their fraction)."""
    point = noise = sum_s = sum_st = 0.0
    t = start_t
    end = start_t + days
    while t < end - 1e-9:
        day = math.floor(t)
        frac = min(end, day + 1) - t
        s = f.seasonal[(f.first_weekday + day) % 7] * frac
        level = max(0.0, f.a + f.b * (day + 0.5))
        point += s * level
        noise += (s * level) ** 2 / max(frac, 1e-9) * f.rel2  # a fraction of a day: its share of the variance
        sum_s += s
        sum_st += s * (day + 0.5 - f.t_mean)
        t = day + 1
    if f.m == 0:
        return Projection(days, 0, 0, 0)
    v = noise + f.sigma2 * (sum_s * sum_s / f.m + sum_st * sum_st / f.sxx)
    half = Z80 * math.sqrt(max(v, 0.0))
    return Projection(days, round(point), max(0, round(point - half)), round(point + half))


def series_forecast(daily: list[int], first_weekday: int, horizons: tuple[int, ...] = HORIZONS) -> SeriesForecast:
    """`daily`: settled micro-dollars per complete day, oldest first; `first_weekday`: 0 = Monday."""
    daily = daily[-HISTORY_DAYS:] if len(daily) > HISTORY_DAYS else daily
    f = _fit(daily, first_weekday)
    n = len(daily)
    trend = "stable"
    if f.m > 3 and f.sigma2 > 0:
        level = max(abs(f.a + f.b * (n - 1)), 1.0)
        t_stat = f.b / math.sqrt(f.sigma2 / f.sxx)
        if abs(t_stat) > 2 and abs(7 * f.b) / level > 0.02:
            trend = "increasing" if f.b > 0 else "decreasing"
    elif f.m > 3 and f.b != 0:  # a perfect line
        trend = "increasing" if f.b > 0 else "decreasing"
    return SeriesForecast(n, trend, f.b, f.seasonal, tuple(_project(f, n, h) for h in horizons))


def rest_of_period(daily: list[int], first_weekday: int, day_fraction: float, days: float) -> Projection:
    """What the next `days` (fractional) add, starting `day_fraction` into the day after `daily`'s last."""
    daily = daily[-HISTORY_DAYS:] if len(daily) > HISTORY_DAYS else daily
    return _project(_fit(daily, first_weekday), len(daily) + day_fraction, days)
