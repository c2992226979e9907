"""One suite, both stores: the same behaviour is required of SQLite and Redis."""

import asyncio
import time
import uuid

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from nexus_extproc.ledger import ReserveItem, SpendRecord, open_ledger


def rec(cost: int = 0) -> SpendRecord:
    return SpendRecord(time.time(), "gpt-4o", "openai", 10, 5, cost, "usage")


@pytest.fixture(params=["sqlite", "redis"])
def ledger_factory(request, tmp_path):
    shared = uuid.uuid4().hex[:8]

    def make(fresh: bool = False):
        """Ledgers from one call share a store (like workers do); `fresh` gives an empty one."""
        name = uuid.uuid4().hex[:8] if fresh else shared
        if request.param == "sqlite":
            return open_ledger("sqlite", path=str(tmp_path / f"ledger-{name}.db"), timeout_ms=5000)
        url = request.getfixturevalue("redis_url")
        return open_ledger("redis", url=url, key_prefix=f"t{name}", timeout_ms=2000)

    make.kind = request.param
    yield make


async def test_reserve_settle_release(ledger_factory):
    led = ledger_factory()
    r = await led.reserve("a", [ReserveItem("g", "2026-11", 100)], time.time() + 60)
    assert r.admitted and (await led.totals("g", "2026-11")).reserved == 100
    assert await led.settle("a", [("g", "2026-11")], 70, rec(70))
    t = await led.totals("g", "2026-11")
    assert (t.settled, t.reserved) == (70, 0)
    await led.reserve("b", [ReserveItem("g", "2026-11", 40)], time.time() + 60)
    assert await led.release("b") == 1
    t = await led.totals("g", "2026-11")
    assert (t.settled, t.reserved) == (70, 0)
    await led.close()


async def test_double_settle_is_idempotent(ledger_factory):
    led = ledger_factory()
    await led.reserve("a", [ReserveItem("g", "p", 10)], time.time() + 60)
    assert await led.settle("a", [("g", "p")], 10, rec(10))
    assert not await led.settle("a", [("g", "p")], 10, rec(10))
    assert (await led.totals("g", "p")).settled == 10
    assert await led.settlement_count() == 1
    await led.close()


async def test_cap_refuses_atomically_and_reports_totals(ledger_factory):
    led = ledger_factory()
    assert (await led.reserve("a", [ReserveItem("g", "p", 60, cap=100)], time.time() + 60)).admitted
    r = await led.reserve("b", [ReserveItem("g", "p", 50, cap=100)], time.time() + 60)
    assert not r.admitted and r.totals[0].reserved == 60
    await led.close()


async def test_multi_budget_reservation_is_all_or_nothing(ledger_factory):
    led = ledger_factory()
    await led.reserve("x", [ReserveItem("team", "p", 90)], time.time() + 60)
    r = await led.reserve("y", [ReserveItem("global", "p", 20, cap=1000), ReserveItem("team", "p", 20, cap=100)],
                          time.time() + 60)
    assert not r.admitted
    assert (await led.totals("global", "p")).reserved == 0
    await led.close()


async def test_expired_reservations_are_reaped(ledger_factory):
    led = ledger_factory()
    await led.reserve("old", [ReserveItem("g", "p", 30)], time.time() - 1)
    await led.reserve("new", [ReserveItem("g", "p", 5)], time.time() + 60)
    assert await led.reap(time.time()) == 1
    assert (await led.totals("g", "p")).reserved == 5
    # A late settle of a reaped reservation still records the spend, once.
    assert await led.settle("old", [("g", "p")], 30, rec(30))
    t = await led.totals("g", "p")
    assert (t.settled, t.reserved) == (30, 5)
    await led.close()


async def test_settle_lands_in_period_it_was_reserved_in(ledger_factory):
    led = ledger_factory()
    await led.reserve("a", [ReserveItem("g", "2026-11", 10)], time.time() + 60)
    await led.settle("a", [("g", "2026-12")], 8, rec(8))
    assert (await led.totals("g", "2026-11")).settled == 8
    assert (await led.totals("g", "2026-12")).settled == 0
    await led.close()


async def test_first_seen_once(ledger_factory):
    a, b = ledger_factory(), ledger_factory()
    results = [await a.first_seen("g", "2026-12", 1.0), await b.first_seen("g", "2026-12", 2.0)]
    assert results == [True, False]
    await a.close()
    await b.close()


async def test_200_concurrent_reservations_admit_at_most_50(ledger_factory):
    """Each costs 1/50 of the limit under a cap: no admission race lets a 51st through."""
    limit = 1_000_000
    ledgers = [ledger_factory() for _ in range(4)]  # several connections, as several workers would have

    async def one(i: int) -> bool:
        led = ledgers[i % len(ledgers)]
        r = await led.reserve(f"r{i}", [ReserveItem("g", "p", limit // 50, cap=limit)], time.time() + 60)
        return r.admitted

    results = await asyncio.gather(*(one(i) for i in range(200)))
    assert sum(results) == 50
    t = await ledgers[0].totals("g", "p")
    assert t.reserved == 50 * (limit // 50) <= limit
    for led in ledgers:
        await led.close()


class LedgerModel(RuleBasedStateMachine):
    """Random reserve/settle/release/reap sequences against an exact in-memory model."""

    factory = None

    def __init__(self):
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.led = type(self).factory(fresh=True)
        self.reserved: dict[str, int] = {}
        self.settled_ids: set[str] = set()
        self.settled = 0
        self.n = 0

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    @rule(amount=st.integers(0, 1000), cap=st.one_of(st.none(), st.integers(0, 5000)))
    def reserve(self, amount, cap):
        self.n += 1
        rid = f"r{self.n}"
        fits = cap is None or self.settled + sum(self.reserved.values()) + amount <= cap
        r = self.run(self.led.reserve(rid, [ReserveItem("g", "p", amount, cap)], time.time() + 3600))
        assert r.admitted == fits
        if fits:
            self.reserved[rid] = amount

    @rule(data=st.data(), cost=st.integers(0, 1000))
    def settle(self, data, cost):
        ids = sorted(self.reserved) + sorted(self.settled_ids)
        if not ids:
            return
        rid = data.draw(st.sampled_from(ids))
        applied = self.run(self.led.settle(rid, [("g", "p")], cost, rec(cost)))
        assert applied == (rid not in self.settled_ids)
        if applied:
            self.reserved.pop(rid, None)
            self.settled_ids.add(rid)
            self.settled += cost

    @rule(data=st.data())
    def release(self, data):
        if not self.reserved:
            return
        rid = data.draw(st.sampled_from(sorted(self.reserved)))
        assert self.run(self.led.release(rid)) == 1
        del self.reserved[rid]

    @invariant()
    def totals_match(self):
        t = self.run(self.led.totals("g", "p"))
        assert (t.settled, t.reserved) == (self.settled, sum(self.reserved.values()))

    def teardown(self):
        self.run(self.led.close())
        self.loop.close()


def test_state_machine_matches_exact_model(ledger_factory):
    LedgerModel.factory = staticmethod(ledger_factory)
    settings_ = settings(max_examples=25, stateful_step_count=25, deadline=None)
    test_case = LedgerModel.TestCase
    test_case.settings = settings_
    test_case().runTest()


def test_sqlite_refuses_a_file_from_another_schema_version(tmp_path):
    import sqlite3

    from nexus_extproc.ledger.sqlite import LedgerSchemaError

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE totals (budget TEXT, period TEXT, settled INTEGER, reserved INTEGER)")  # unversioned
    db.commit()
    db.close()
    with pytest.raises(LedgerSchemaError, match="schema version 0"):
        open_ledger("sqlite", path=str(path))
    fresh = open_ledger("sqlite", path=str(tmp_path / "new.db"))  # a new file gets the current version
    again = open_ledger("sqlite", path=str(tmp_path / "new.db"))  # and reopening it is fine
    assert fresh is not again
