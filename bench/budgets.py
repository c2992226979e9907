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


async def cpu_per_request(budgets: list[dict], n: int) -> float:
    d = tempfile.mkdtemp()
    cfg = parse_config({"backends": BACKENDS, "budgets": budgets, "store": {"kind": "sqlite", "path": f"{d}/l.db"}},
                       environ={})
    svc = BudgetService(cfg, open_ledger("sqlite", path=f"{d}/l.db"))
    target, facts = Target("openai", "cloud", "gpt-4o", 100), RequestFacts("gpt-4o", "cloud")
    rec = SpendRecord(time.time(), "gpt-4o", "openai", 1, 1, 100, "usage")
    for i in range(200):  # warm-up: tables, caches, period rows
        adm = await svc.admit(f"w{i}", target, None, facts)
        await svc.settle(f"w{i}", adm, 90, rec)
    t0 = time.process_time()
    for i in range(n):
        adm = await svc.admit(f"r{i}", target, None, facts)
        await svc.settle(f"r{i}", adm, 90, rec)
    return (time.process_time() - t0) / n * 1e6


async def main() -> None:
    ones, fives = [], []
    for _ in range(8):
        ones.append(await cpu_per_request(ONE, 1500))
        fives.append(await cpu_per_request(FIVE, 1500))
    diffs = [b - a for a, b in zip(ones, fives, strict=True)]
    print(f"admit + settle CPU per request: 1 budget {statistics.median(ones):.0f} µs, "
          f"5 matching budgets {statistics.median(fives):.0f} µs")
    print(f"five budgets vs one, paired median: {statistics.median(diffs):+.0f} µs "
          f"(range {min(diffs):+.0f} … {max(diffs):+.0f} µs over 8 rounds); target ≤ +50 µs")


if __name__ == "__main__":
    asyncio.run(main())
