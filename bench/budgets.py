"""CPU cost of more budgets on the request path: admit + settle with one budget vs five matching budgets.

In-process on the SQLite ledger (no Envoy, no gRPC), so machine noise is small enough to resolve tens of µs; one
and five budgets are measured alternately, eight rounds each, and the paired differences' median is printed.
Through Envoy, `bench/overhead.py` shows the same comparison but this VM's noise (±30 % per run) hides it.

    python bench/budgets.py
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nexus_extproc.budget import BudgetService
from nexus_extproc.config import parse_config
from nexus_extproc.ledger import SpendRecord, open_ledger
from nexus_extproc.policy import Target
from nexus_extproc.scopes import RequestFacts

ONE = [{"name": "global", "limit_usd": 1_000_000}]
FIVE = [*ONE,
        {"name": "gpt4o", "scope": {"model": "gpt-4o*"}, "limit_usd": 100_000},
        {"name": "cloud", "scope": {"backend_type": "cloud"}, "limit_usd": 100_000},
        {"name": "daily", "period": "daily", "limit_usd": 100_000, "hard_limit_action": "block_all"},
        {"name": "weekly", "period": "weekly", "limit_usd": 100_000}]
BACKENDS = {"openai": {"cluster": "openai", "type": "cloud", "provider": "openai", "default": True}}


async def service(budgets: list[dict]) -> tuple[BudgetService, int]:
    d = tempfile.mkdtemp()
    cfg = parse_config({"backends": BACKENDS, "budgets": budgets, "store": {"kind": "sqlite", "path": f"{d}/l.db"}},
                       environ={})
    svc = BudgetService(cfg, open_ledger("sqlite", path=f"{d}/l.db"))
    await block(svc, "w", 300)  # warm-up: tables, caches, period rows
    return svc, 0


TARGET, FACTS = Target("openai", "cloud", "gpt-4o", 100), RequestFacts("gpt-4o", "cloud")
RECORD = SpendRecord(time.time(), "gpt-4o", "openai", 1, 1, 100, "usage")


async def block(svc: BudgetService, prefix: str, n: int) -> float:
    """CPU µs per request (admit + settle) over `n` sequential requests."""
    t0 = time.process_time()
    for i in range(n):
        adm = await svc.admit(f"{prefix}{i}", TARGET, None, FACTS)
        await svc.settle(f"{prefix}{i}", adm, 90, RECORD)
    return (time.process_time() - t0) / n * 1e6


async def main() -> None:
    # Both services live side by side and run in alternating short blocks, so a slow spell of the machine hits
    # both alike; the figure is the median of the paired block differences.
    (one, _), (five, _) = await service(ONE), await service(FIVE)
    ones, fives = [], []
    for r in range(ROUNDS):
        ones.append(await block(one, f"a{r}-", BLOCK))
        fives.append(await block(five, f"b{r}-", BLOCK))
    diffs = sorted(b - a for a, b in zip(ones, fives, strict=True))
    q1, q3 = diffs[len(diffs) // 4], diffs[3 * len(diffs) // 4]
    print(f"admit + settle CPU per request ({ROUNDS} alternating blocks of {BLOCK}): "
          f"1 budget {statistics.median(ones):.0f} µs, 5 matching budgets {statistics.median(fives):.0f} µs")
    print(f"five budgets vs one, paired median: {statistics.median(diffs):+.0f} µs "
          f"(interquartile {q1:+.0f} … {q3:+.0f} µs); target ≤ +50 µs")


ROUNDS, BLOCK = 40, 250

if __name__ == "__main__":
    asyncio.run(main())
