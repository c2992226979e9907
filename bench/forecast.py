"""Backtest of the spend forecast (budget/forecast.py) on synthetic daily series with a known answer.

Each scenario draws series from a known process (level, trend, day-of-week pattern, noise), forecasts from 56
days of history, and compares with the next 7/30/90 days actually drawn: the share of realised sums inside the
80 % interval (coverage; 0.80 is right) and the mean absolute percentage error of the point forecast (MAPE).
It also checks the trend label against the process's trend. Deterministic (seeded).

    python bench/forecast.py [--trials N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nexus_extproc.budget.forecast import HORIZONS, series_forecast

WEEKDAY = [1.25, 1.25, 1.2, 1.2, 1.1, 0.5, 0.5]  # agent traffic: busy weekdays, quiet weekends
FLAT = [1.0] * 7
SCENARIOS = {
    # name: (daily level in micro-USD, growth per day (fraction of the level), weekly pattern, noise sd, trend)
    "stable": (2_000_000, 0.0, FLAT, 0.10, "stable"),
    "stable, weekly pattern": (2_000_000, 0.0, WEEKDAY, 0.10, "stable"),
    "growing 1 %/day, weekly": (2_000_000, 0.01, WEEKDAY, 0.10, "increasing"),
    "shrinking 0.5 %/day": (2_000_000, -0.005, FLAT, 0.10, "decreasing"),
    "noisy (30 %), weekly": (2_000_000, 0.0, WEEKDAY, 0.30, "stable"),
}
HISTORY = 56


def draw(rng: random.Random, level: float, growth: float, pattern: list[float], noise: float, days: int,
         first_weekday: int) -> list[int]:
    out = []
    for t in range(days):
        mean = level * (1 + growth * t) * pattern[(first_weekday + t) % 7]
        out.append(max(0, round(mean * (1 + noise * rng.gauss(0, 1)))))
    return out


def run(trials: int) -> dict[str, dict[str, object]]:
    rng = random.Random(20261206)
    results: dict[str, dict[str, object]] = {}
    for name, (level, growth, pattern, noise, want_trend) in SCENARIOS.items():
        inside = {h: 0 for h in HORIZONS}
        ape: dict[int, list[float]] = {h: [] for h in HORIZONS}
        trend_ok = 0
        for _ in range(trials):
            wd = rng.randrange(7)
            series = draw(rng, level, growth, pattern, noise, HISTORY + max(HORIZONS), wd)
            fc = series_forecast(series[:HISTORY], wd)
            trend_ok += fc.trend == want_trend
            for p in fc.horizons:
                h = int(p.days)
                actual = sum(series[HISTORY:HISTORY + h])
                inside[h] += p.low_micros <= actual <= p.high_micros
                ape[h].append(abs(p.point_micros - actual) / max(actual, 1))
        results[name] = {
            "coverage_80": {str(h): round(inside[h] / trials, 3) for h in HORIZONS},
            "mape_percent": {str(h): round(100 * sum(ape[h]) / trials, 2) for h in HORIZONS},
            "trend_label_correct": round(trend_ok / trials, 3),
        }
    return results


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=400)
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args()
    res = run(args.trials)
    print(f"forecast backtest: {args.trials} series per scenario, {HISTORY} days of history, 80 % intervals")
    print(f"{'scenario':28} {'coverage 7/30/90 d':22} {'MAPE % 7/30/90 d':22} trend label right")
    for name, r in res.items():
        cov = "/".join(f"{v:.2f}" for v in r["coverage_80"].values())  # type: ignore[attr-defined]
        mape = "/".join(f"{v:.1f}" for v in r["mape_percent"].values())  # type: ignore[attr-defined]
        print(f"{name:28} {cov:22} {mape:22} {r['trend_label_correct']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"trials": args.trials, "history_days": HISTORY, "scenarios": res},
                                              indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
