"""The outbox under the faults that hit it in production: a line torn by kill -9 or ENOSPC, a replay claim
left by a dead process, a disk that refuses the append, and a store that goes away mid-replay. The ledger
is the real SQLite one; only its availability is switched, by a wrapper."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from nexus_extproc.budget.policy import Action, Target
from nexus_extproc.budget.service import BudgetService, BudgetStoreDown
from nexus_extproc.ledger import Ledger, SpendRecord, StoreUnavailable, open_ledger
from nexus_extproc.ledger.outbox import Outbox, encode
from nexus_extproc.ops import metrics
from tests.conftest import make_config

pytestmark = pytest.mark.faults

CLOUD = Target("openai", "cloud", "gpt-4o", 20_000)


class Switchable:
    """The real ledger behind a switch: `down` refuses every call; `settles_left` lets that many settles
    through and then goes down (the store dying in the middle of a replay)."""

    def __init__(self, inner: Ledger) -> None:
        self.inner = inner
        self.down = False
        self.settles_left: int | None = None

    def __getattr__(self, name: str) -> Any:
        real = getattr(self.inner, name)

        async def call(*a: Any, **k: Any) -> Any:
            if name == "settle" and self.settles_left is not None:
                if self.settles_left <= 0:
                    self.down = True
                self.settles_left -= 1
            if self.down:
                raise StoreUnavailable("switched off")
            return await real(*a, **k)

        return call


def entry(i: int, cost: int = 1000) -> dict[str, Any]:
    return {"req_id": f"r{i}", "items": [["global", "2026-12"]], "cost": cost,
            "record": {"ts": 1_800_000_000.0 + i, "model": "gpt-4o", "backend": "openai",
                       "input_tokens": 10, "output_tokens": 5, "estimate": cost, "source": "usage"}}


def metric(m: Any) -> float:
    return float(m._value.get())


async def settled(ledger: Ledger) -> tuple[int, int]:
    t = await ledger.totals("global", "2026-12")
    return t.settled, await ledger.settlement_count()


async def test_torn_line_costs_only_itself_and_the_loop_goes_on(tmp_path):
    path = tmp_path / "outbox.jsonl"
    torn = encode(entry(2))[:-20]  # kill -9 mid-append: no newline, no tail
    path.write_bytes(encode(entry(1)) + torn)
    box = Outbox(str(path))
    assert box.append(entry(3))  # appending after a torn line starts on a fresh line
    ledger = open_ledger("sqlite", path=str(tmp_path / "l.db"))
    before = metric(metrics.outbox_corrupt)
    assert await box.replay(ledger) == 2
    assert await settled(ledger) == (2000, 2)
    assert metric(metrics.outbox_corrupt) == before + 1
    assert box.corrupt_path.read_bytes() == torn + b"\n"  # kept for an operator, byte for byte
    assert not path.exists() and not list(tmp_path.glob("outbox.jsonl.replay-*"))
    assert await box.replay(ledger) == 0 and await settled(ledger) == (2000, 2)  # nothing charged twice
    await ledger.close()


def dead_pid() -> int:
    dead = subprocess.Popen(["true"])
    dead.wait()
    return dead.pid


async def test_claim_left_by_a_dead_process_is_adopted(tmp_path):
    pid = dead_pid()
    (tmp_path / f"outbox.jsonl.replay-{pid}").write_bytes(encode(entry(1)) + encode(entry(2)))
    ledger = open_ledger("sqlite", path=str(tmp_path / "l.db"))
    assert await Outbox(str(tmp_path / "outbox.jsonl")).replay(ledger) == 2
    assert await settled(ledger) == (2000, 2)
    assert not list(tmp_path.glob("outbox.jsonl.replay-*"))
    await ledger.close()


def unwritable_service(tmp_path: Path, mode: str) -> tuple[BudgetService, Switchable]:
    """A budget service whose outbox cannot be written (a file stands where its directory should be)."""
    (tmp_path / "file").write_text("a file where the outbox directory should be")
    db = tmp_path / "l.db"
    cfg = make_config(budget={"monthly_limit_usd": 100}, store_failure=mode,
                      store={"kind": "sqlite", "path": str(db), "outbox_path": str(tmp_path / "file" / "ob.jsonl")})
    led = Switchable(open_ledger("sqlite", path=str(db)))
    return BudgetService(cfg, led), led  # type: ignore[arg-type]


async def test_unwritable_disk_holds_settlements_in_memory_until_the_store_is_back(tmp_path):
    svc, led = unwritable_service(tmp_path, "open")
    led.down = True
    fails = metric(metrics.outbox_failures)
    for i in range(5):
        adm = await svc.admit(f"r{i}", CLOUD, None)
        assert adm.decision.action is Action.ALLOW and adm.outbox
        await svc.settle(f"r{i}", adm, 700, SpendRecord(time.time(), "gpt-4o", "openai", 1, 1, 20_000, "usage"))
    assert len(svc.outbox.pending) == 5 and metric(metrics.settlements_pending) == 5
    assert metric(metrics.outbox_failures) == fails + 5
    await svc.reconcile_once()  # store still down: nothing lost, nothing raised
    assert len(svc.outbox.pending) == 5
    led.down = False
    await svc.reconcile_once()
    assert svc.outbox.pending == [] and metric(metrics.settlements_pending) == 0
    t = await led.inner.totals("global", svc.book.period().key)
    assert t.settled == 3500 and await led.inner.settlement_count() == 5
    await led.inner.close()


async def test_store_dying_mid_replay_keeps_the_rest_for_the_next_pass(tmp_path):
    path = tmp_path / "outbox.jsonl"
    path.write_bytes(b"".join(encode(entry(i)) for i in range(10)))
    led = Switchable(open_ledger("sqlite", path=str(tmp_path / "l.db")))
    led.settles_left = 4
    box = Outbox(str(path))
    with pytest.raises(StoreUnavailable):
        await box.replay(led)  # type: ignore[arg-type]
    assert await settled(led.inner) == (4000, 4)
    led.down, led.settles_left = False, None
    assert await box.replay(led) == 6  # type: ignore[arg-type]
    assert await settled(led.inner) == (10_000, 10)
    await led.inner.close()


async def test_reconciler_loop_survives_a_step_that_keeps_failing(tmp_path):
    db = tmp_path / "l.db"
    cfg = make_config(budget={"monthly_limit_usd": 100},
                      store={"kind": "sqlite", "path": str(db), "outbox_path": str(tmp_path / "ob.jsonl")})
    real = open_ledger("sqlite", path=str(db))

    class BrokenReap(Switchable):
        def __getattr__(self, name: str) -> Any:
            if name == "reap":
                async def boom(*a: Any, **k: Any) -> Any:
                    raise RuntimeError("a bug in one step")
                return boom
            return super().__getattr__(name)

    svc = BudgetService(cfg, BrokenReap(real))  # type: ignore[arg-type]
    (tmp_path / "ob.jsonl").write_bytes(b"not a line\n" + encode(entry(1)))
    errors = metrics.reconciler_errors.labels("reap")
    before = metric(errors)
    task = asyncio.create_task(svc.run_reconciler(0.05, 0.05))
    try:
        for _ in range(100):
            await asyncio.sleep(0.02)
            if metric(errors) >= before + 3:
                break
    finally:
        task.cancel()
    assert metric(errors) >= before + 3, "the loop stopped after the failing step"
    assert not task.done() or task.cancelled()
    assert await real.settlement_count() == 1  # the outbox step still ran every pass
    assert await real.get_meta("last_reconciliation")
    await real.close()


async def test_closed_mode_refuses_while_settlements_wait_in_memory(tmp_path):
    svc, led = unwritable_service(tmp_path, "closed")
    adm = await svc.admit("r1", CLOUD, None)
    assert adm.decision.action is Action.ALLOW and not adm.outbox
    led.down = True  # the store goes away while r1 is at the provider, and the disk refuses the outbox
    await svc.settle("r1", adm, 900, SpendRecord(time.time(), "gpt-4o", "openai", 1, 1, 20_000, "usage"))
    assert len(svc.outbox.pending) == 1
    led.down = False
    with pytest.raises(BudgetStoreDown):
        await svc.admit("r2", CLOUD, None)  # the store is back, but r1's settlement is only in memory
    await svc.reconcile_once()
    assert svc.outbox.pending == []
    assert (await svc.admit("r3", CLOUD, None)).decision.action is Action.ALLOW
    assert (await led.inner.totals("global", svc.book.period().key)).settled == 900
    await led.inner.close()


async def test_a_late_reports_correction_waits_in_the_outbox_while_the_store_is_down(tmp_path):
    """Issue 27: a request settled at its estimate (no report in time) whose report comes while the store is
    down: the correction is kept in the outbox behind the settlement and applied once the store is back; the
    replay, like the ledger, corrects only an estimate and only once."""
    db = tmp_path / "l.db"
    cfg = make_config(budget={"monthly_limit_usd": 100}, store_failure="open",
                      store={"kind": "sqlite", "path": str(db), "outbox_path": str(tmp_path / "ob.jsonl")})
    led = Switchable(open_ledger("sqlite", path=str(db)))
    svc = BudgetService(cfg, led)  # type: ignore[arg-type]
    keys = [("global", svc.book.period().key)]
    adm = await svc.admit("late", CLOUD, None)
    assert await svc.settle("late", adm, CLOUD.estimate_micros,
                            SpendRecord(time.time(), "gpt-4o", "openai", 10, 64, CLOUD.estimate_micros, "estimate"))
    led.down = True
    exact = SpendRecord(time.time(), "gpt-4o", "openai", 10, 3, CLOUD.estimate_micros, "usage")
    assert await svc.correct("late", adm, 123, exact)  # held, not lost
    assert await svc.correct("late", adm, 7, exact)  # a second report: held too, but will move nothing
    assert (await led.inner.totals(*keys[0])).settled == CLOUD.estimate_micros
    led.down = False
    await svc.reconcile_once()
    assert (await led.inner.totals(*keys[0])).settled == 123
    aggs = [a for a in await led.inner.spend(0, time.time() + 10) if a.budget == "global"]
    assert [(a.requests, a.cost, a.output_tokens) for a in aggs] == [(1, 123, 3)]
    await led.inner.close()
