"""CPU cost of more budgets on the request path: admit + settle with one budget vs five matching budgets.

In-process on the ledger (no Envoy, no gRPC), so machine noise is small enough to resolve tens of µs. Two
services live side by side (one budget; five budgets that all match the request) and run in alternating short
blocks, so a slow spell of the machine hits both alike; the figure is the median of the paired block
differences. Each ledger first gets two years of daily history rows per budget, as a long-running one has.
Through Envoy, `bench/overhead.py` makes the same comparison, but this VM's noise (±30 % per run) hides it.

    python bench/budgets.py                  # SQLite, the embedded default
    python bench/budgets.py --store redis    # starts redis-server on a free 127.0.0.1 port; also its CPU
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nexus_dev.stack import free_port
from nexus_extproc.budget.policy import Target
from nexus_extproc.budget.scopes import RequestFacts
from nexus_extproc.budget.service import BudgetService
from nexus_extproc.config import parse_config
from nexus_extproc.ledger import Ledger, SpendRecord, open_ledger

ONE = [{"name": "global", "limit_usd": 1_000_000}]
FIVE = [*ONE,
        {"name": "gpt4o", "scope": {"model": "gpt-4o*"}, "limit_usd": 100_000},
        {"name": "cloud", "scope": {"backend_type": "cloud"}, "limit_usd": 100_000},
        {"name": "daily", "period": "daily", "limit_usd": 100_000, "hard_limit_action": "block_all"},
        {"name": "weekly", "period": "weekly", "limit_usd": 100_000}]
BACKENDS = {"openai": {"cluster": "openai", "type": "cloud", "provider": "openai", "default": True}}
TARGET, FACTS = Target("openai", "cloud", "gpt-4o", 100), RequestFacts("gpt-4o", "cloud")
RECORD = SpendRecord(time.time(), "gpt-4o", "openai", 1, 1, 100, "usage")
HISTORY_DAYS = 730


async def history(ledger: Ledger, budgets: list[dict]) -> None:
    """Old periods' totals rows, so lookups run against a table of realistic size."""
    today = datetime.now(UTC).date()
    for n in range(1, HISTORY_DAYS + 1):
        key = (today - timedelta(days=n)).isoformat()
        await ledger.reserve(f"h{n}", [(b["name"], key) for b in budgets], 1, time.time() + 3600)
        await ledger.settle(f"h{n}", [(b["name"], key) for b in budgets], 1, RECORD)


async def service(budgets: list[dict], store: dict) -> BudgetService:
    cfg = parse_config({"backends": BACKENDS, "budgets": budgets, "store": store}, environ={})
    kwargs = {k: v for k, v in store.items() if k != "kind"}
    svc = BudgetService(cfg, open_ledger(store["kind"], **kwargs))
    assert svc.ledger is not None
    await history(svc.ledger, budgets)
    await block(svc, "w", 300)  # warm-up: caches, this period's rows
    return svc


async def block(svc: BudgetService, prefix: str, n: int) -> float:
    """CPU µs per request (admit + settle) over `n` sequential requests."""
    t0 = time.process_time()
    for i in range(n):
        adm = await svc.admit(f"{prefix}{i}", TARGET, None, FACTS)
        await svc.settle(f"{prefix}{i}", adm, 90, RECORD)
    return (time.process_time() - t0) / n * 1e6


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


async def compare(args: argparse.Namespace, stores: list[dict], redis: subprocess.Popen[bytes] | None) -> None:
    one, five = await service(ONE, stores[0]), await service(FIVE, stores[1])
    ones: list[float] = []
    fives: list[float] = []
    server = {"1": 0.0, "5": 0.0}
    for r in range(args.rounds):
        for svc, out, tag in ((one, ones, "1"), (five, fives, "5")):
            s0 = proc_cpu_s(redis.pid) if redis else 0.0
            out.append(await block(svc, f"{tag}-{r}-", args.block))
            if redis:
                server[tag] += proc_cpu_s(redis.pid) - s0
    diffs = sorted(b - a for a, b in zip(ones, fives, strict=True))
    q1, q3 = diffs[len(diffs) // 4], diffs[3 * len(diffs) // 4]
    print(f"{args.store}: admit + settle CPU per request in this process ({args.rounds} alternating blocks of "
          f"{args.block}, {HISTORY_DAYS} days of history rows per budget): 1 budget "
          f"{statistics.median(ones):.0f} µs, 5 matching budgets {statistics.median(fives):.0f} µs")
    print(f"five budgets vs one, paired median: {statistics.median(diffs):+.0f} µs "
          f"(interquartile {q1:+.0f} … {q3:+.0f} µs); target ≤ +50 µs")
    if redis:
        n = args.rounds * args.block
        print(f"redis-server CPU per request (10 ms clock ticks, rough): 1 budget {server['1'] / n * 1e6:.0f} µs, "
              f"5 budgets {server['5'] / n * 1e6:.0f} µs")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", choices=("sqlite", "redis"), default="sqlite")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--block", type=int, default=250)
    ap.add_argument("--history-days", type=int, default=HISTORY_DAYS)
    args = ap.parse_args()
    globals()["HISTORY_DAYS"] = args.history_days

    tmp = Path(tempfile.mkdtemp(prefix="nexus-bench-budgets-"))
    redis: subprocess.Popen[bytes] | None = None
    try:
        if args.store == "redis":
            binary = shutil.which("redis-server")
            if binary is None:
                sys.exit("redis-server is not installed")
            port = free_port()
            redis = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no"], stdout=subprocess.DEVNULL)
            time.sleep(0.5)
            stores = [{"kind": "redis", "url": f"redis://127.0.0.1:{port}/0", "key_prefix": p} for p in ("a", "b")]
        else:
            stores = [{"kind": "sqlite", "path": str(tmp / f"{p}.db")} for p in ("a", "b")]
        asyncio.run(compare(args, stores, redis))
    finally:
        if redis:
            redis.terminate()
            redis.wait(5)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
