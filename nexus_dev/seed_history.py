"""Seed a demo ledger with synthetic past spend, so forecasts and the budget page have a history to show.

    python -m nexus_dev.seed_history --config examples/demo.yaml --days 28 --daily-usd 0.60

Each past day gets settlements under the budgets a plain request falls under (the global one), with a weekday
pattern (quiet weekends) and a little growth and noise, through the ledger's own reserve/settle calls. The
settlements are marked `task: seeded-history` so reports can tell them apart. Synthetic by construction: for
demos and docs, never for a production store.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import uuid
from datetime import UTC, datetime, timedelta

from nexus_extproc.app import open_store
from nexus_extproc.budget.periods import period_for
from nexus_extproc.config import load_config
from nexus_extproc.ledger import SpendRecord

WEEKDAY = [1.2, 1.25, 1.2, 1.15, 1.1, 0.55, 0.55]


async def seed(config_path: str, days: int, daily_usd: float, growth: float, seed: int) -> int:
    config = load_config(config_path)
    ledger = open_store(config)
    if ledger is None:
        raise SystemExit("no budget in this config: nothing to seed")
    defs = [d for d in config.budget_defs() if d.scope == "global"]
    rng = random.Random(seed)
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    n = 0
    for back in range(days, 0, -1):
        day = today - timedelta(days=back)
        t = days - back
        total = round(daily_usd * 1e6 * (1 + growth * t) * WEEKDAY[day.weekday()] * (1 + 0.1 * rng.gauss(0, 1)))
        for k in range(10):  # ten requests a day
            ts = (day + timedelta(hours=8 + k)).timestamp()
            cost = max(0, total // 10)
            keys = [(d.name, period_for(d.period, datetime.fromtimestamp(ts, UTC)).key) for d in defs]
            rid = f"seed-{uuid.uuid4().hex}"
            await ledger.reserve(rid, keys, cost, ts + 3600)
            await ledger.settle(rid, keys, cost, SpendRecord(ts, "gpt-4o", "openai", 2_000, 150, cost, "usage",
                                                             task="seeded-history", streamed=True))
            n += 1
    await ledger.close()
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="examples/demo.yaml")
    ap.add_argument("--days", type=int, default=28)
    ap.add_argument("--daily-usd", type=float, default=0.60)
    ap.add_argument("--growth", type=float, default=0.02, help="daily growth as a fraction of day one")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    n = asyncio.run(seed(args.config, args.days, args.daily_usd, args.growth, args.seed))
    print(f"seeded {n} settlements over {args.days} days")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
