"""One suite, every store: the same behaviour is required of SQLite, Redis and a 3-master Redis Cluster."""

import asyncio
import time
import uuid
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from nexus_extproc.ledger import AuditRecord, ForwardNote, ReapResult, SpendRecord, open_ledger
from nexus_extproc.ledger.base import rolling_key
from nexus_extproc.ledger.sqlite_schema import SCHEMA_VERSION


def rec(cost: int = 0) -> SpendRecord:
    return SpendRecord(time.time(), "gpt-4o", "openai", 10, 5, cost, "usage")


@pytest.fixture(params=["sqlite", "redis", "redis-cluster"])
def ledger_factory(request, tmp_path):
    shared = uuid.uuid4().hex[:8]

    def make(fresh: bool = False):
        """Ledgers from one call share a store (like workers do); `fresh` gives an empty one."""
        name = uuid.uuid4().hex[:8] if fresh else shared
        if request.param == "sqlite":
            return open_ledger("sqlite", path=str(tmp_path / f"ledger-{name}.db"), timeout_ms=5000)
        if request.param == "redis-cluster":
            url = request.getfixturevalue("redis_cluster_url")
            return open_ledger("redis", url=url, key_prefix=f"t{name}", timeout_ms=2000, cluster=True)
        url = request.getfixturevalue("redis_url")
        return open_ledger("redis", url=url, key_prefix=f"t{name}", timeout_ms=2000)

    make.kind = request.param
    yield make


async def test_reserve_settle_release(ledger_factory):
    led = ledger_factory()
    r = await led.reserve("a", [("g", "2026-11")], 100, time.time() + 60)
    assert r.admitted and (await led.totals("g", "2026-11")).reserved == 100
    assert await led.settle("a", [("g", "2026-11")], 70, rec(70))
    t = await led.totals("g", "2026-11")
    assert (t.settled, t.reserved) == (70, 0)
    await led.reserve("b", [("g", "2026-11")], 40, time.time() + 60)
    assert await led.release("b") == 1
    t = await led.totals("g", "2026-11")
    assert (t.settled, t.reserved) == (70, 0)
    await led.close()


async def test_double_settle_is_idempotent(ledger_factory):
    led = ledger_factory()
    await led.reserve("a", [("g", "p")], 10, time.time() + 60)
    assert await led.settle("a", [("g", "p")], 10, rec(10))
    assert not await led.settle("a", [("g", "p")], 10, rec(10))
    assert (await led.totals("g", "p")).settled == 10
    assert await led.settlement_count() == 1
    await led.close()


async def test_cap_refuses_atomically_and_reports_totals(ledger_factory):
    led = ledger_factory()
    assert (await led.reserve("a", [("g", "p")], 60, time.time() + 60, caps=[100])).admitted
    r = await led.reserve("b", [("g", "p")], 50, time.time() + 60, caps=[100])
    assert not r.admitted and r.totals[0].reserved == 60
    await led.close()


async def test_multi_budget_reservation_is_all_or_nothing(ledger_factory):
    led = ledger_factory()
    await led.reserve("x", [("team", "p")], 90, time.time() + 60)
    r = await led.reserve("y", [("global", "p"), ("team", "p")], 20, time.time() + 60, caps=[1000, 100])
    assert not r.admitted
    assert r.totals == [(0, 0), (0, 90)]  # as seen, nothing reserved
    assert (await led.totals("global", "p")).reserved == 0
    assert (await led.totals("team", "p")).reserved == 90
    r = await led.reserve("z", [("global", "p"), ("team", "p")], 10, time.time() + 60, caps=[1000, 100])
    assert r.admitted and r.totals == [(0, 10), (0, 100)]
    assert await led.settle("z", [("global", "p"), ("team", "p")], 7, rec(7))
    assert await led.totals("global", "p") == (7, 0) and await led.totals("team", "p") == (7, 90)
    await led.close()


async def test_expired_reservations_are_reaped(ledger_factory):
    led = ledger_factory()
    await led.reserve("old", [("g", "p")], 30, time.time() - 1)
    await led.reserve("new", [("g", "p")], 5, time.time() + 60)
    assert await led.reap(time.time()) == ReapResult(released=1)
    assert (await led.totals("g", "p")).reserved == 5
    # A late settle of a reaped reservation still records the spend, once.
    assert await led.settle("old", [("g", "p")], 30, rec(30))
    t = await led.totals("g", "p")
    assert (t.settled, t.reserved) == (30, 5)
    await led.close()


async def test_reaper_charges_forwarded_reservations_once(ledger_factory):
    """A reservation whose request went upstream is charged at its estimate when its process dies; one that
    never left is released. A late settle from a process that was only paused does not charge it twice."""
    led = ledger_factory()
    await led.reserve("fw", [("g", "p"), ("team", "p")], 40, time.time() - 1)
    await led.mark_forwarded("fw", time.time() - 2, ForwardNote("gpt-4o", "openai", "gpt-4o", 123))
    await led.reserve("nf", [("g", "p")], 30, time.time() - 1)
    await led.mark_forwarded("gone", time.time(), ForwardNote("gpt-4o", "openai", "gpt-4o", 1))  # no-op
    assert await led.reap(time.time()) == ReapResult(released=1, charged=1, charged_micros=40)
    assert await led.reap(time.time()) == ReapResult()
    for b in ("g", "team"):
        t = await led.totals(b, "p")
        assert (t.settled, t.reserved) == (40, 0)
    assert not await led.settle("fw", [("g", "p"), ("team", "p")], 55, rec(55))
    assert (await led.totals("g", "p")).settled == 40
    aggs = [a for a in await led.spend(0, time.time() + 10) if a.budget == "g"]
    assert [(a.model, a.requests, a.cost, a.reaped, a.input_tokens) for a in aggs] == [("gpt-4o", 1, 40, 40, 123)]
    await led.close()


async def test_a_reservation_written_forwarded_is_charged_by_the_reaper(ledger_factory):
    """One write on the request path (issue 27): the reservation carries its forwarded mark and note, so a
    process that dies after it is charged the estimate as if it had marked it afterwards; settled normally, the
    mark changes nothing."""
    led = ledger_factory()
    note = ForwardNote("claude-haiku-4-5", "anthropic", "claude-haiku-4-5", 77, "triage", "env=prod")
    assert (await led.reserve("once", [("g", "q"), ("team", "q")], 25, time.time() - 1, caps=[1000, None],
                              forwarded=(time.time() - 2, note))).admitted
    assert (await led.reserve("kept", [("g", "q")], 5, time.time() + 60, forwarded=(time.time(), note))).admitted
    assert await led.reap(time.time()) == ReapResult(released=0, charged=1, charged_micros=25)
    assert (await led.totals("team", "q")).settled == 25
    assert await led.settle("kept", [("g", "q")], 4, rec(4))
    t = await led.totals("g", "q")
    assert (t.settled, t.reserved) == (29, 0)
    aggs = [a for a in await led.spend(0, time.time() + 10) if a.budget == "team"]
    assert [(a.model, a.cost, a.reaped, a.input_tokens) for a in aggs] == [("claude-haiku-4-5", 25, 25, 77)]
    await led.close()


async def test_an_estimate_is_corrected_once_by_a_late_report(ledger_factory):
    """Issue 27: a request settled at its estimate (its usage report came late) is corrected to the real cost;
    only an estimate, only once, and reports count it as one request with the real cost and tokens."""
    led = ledger_factory(fresh=True)
    keys = [("g", "c"), ("team", "c")]
    await led.reserve("late", keys, 90, time.time() + 60)
    est = SpendRecord(time.time(), "gpt-4o", "openai", 100, 64, 90, "estimate")
    assert await led.settle("late", keys, 90, est)
    exact = SpendRecord(time.time(), "gpt-4o", "openai", 100, 12, 90, "usage")
    assert await led.correct("late", keys, 31, exact)
    assert not await led.correct("late", keys, 5, exact)  # once
    for b in ("g", "team"):
        t = await led.totals(b, "c")
        assert (t.settled, t.reserved) == (31, 0)
    aggs = [a for a in await led.spend(0, time.time() + 10) if a.budget == "g"]
    assert [(a.requests, a.cost, a.input_tokens, a.output_tokens) for a in aggs] == [(1, 31, 100, 12)]
    # An exact settlement is never corrected.
    await led.reserve("exact", keys, 50, time.time() + 60)
    assert await led.settle("exact", keys, 40, rec(40))
    assert not await led.correct("exact", keys, 1, exact)
    assert not await led.correct("never", keys, 1, exact)
    assert (await led.totals("g", "c")).settled == 71
    await led.close()


async def test_settlements_keep_their_attribution_for_reports(ledger_factory):
    """Task, tags, backend, cache reads, reserved output and the stream flag come back from `spend`, on both
    stores, also for a settlement the reaper made (from the forwarded note)."""
    led = ledger_factory(fresh=True)
    now = time.time()
    for i, (task, tags, streamed) in enumerate([("triage", "env=prod,team-a", True), ("triage", "env=prod,team-a",
                                                                                       False), ("", "", False)]):
        await led.reserve(f"s{i}", [("g", "p"), ("h", "p")], 100, now + 60)
        await led.settle(f"s{i}", [("g", "p"), ("h", "p")], 50,
                         SpendRecord(now, "gpt-4o", "openai", 1000, 20, 100, "usage", task=task, tags=tags,
                                     team="a" if task else "", agent="bot" if task else "", cache_read_tokens=600,
                                     output_reserved=400, streamed=streamed))
    await led.reserve("r", [("g", "p")], 70, now - 1)
    await led.mark_forwarded("r", now - 2, ForwardNote("gpt-4o", "openai", "gpt-4o", 9, "nightly", "batch"))
    await led.reap(now)
    got = sorted((a.task, a.tags, a.team, a.agent, a.backend, a.requests, a.cost, a.cache_read_tokens,
                  a.output_reserved, a.streamed) for a in await led.spend(0, now + 10) if a.budget == "g")
    assert got == [("", "", "", "", "openai", 1, 50, 600, 400, 0),
                   ("nightly", "batch", "", "", "openai", 1, 70, 0, 0, 0),
                   ("triage", "env=prod,team-a", "a", "bot", "openai", 2, 100, 1200, 800, 1)]
    # Once per settlement, not once per budget: what an export sums.
    once = await led.spend(0, now + 10, per_budget=False)
    assert {a.budget for a in once} == {""} and sum(a.cost for a in once) == 220
    assert sum(a.cost for a in await led.spend(0, now + 10)) == 2 * 150 + 70  # "r" reserved in g only
    await led.close()


async def test_settle_lands_in_period_it_was_reserved_in(ledger_factory):
    led = ledger_factory()
    await led.reserve("a", [("g", "2026-11")], 10, time.time() + 60)
    await led.settle("a", [("g", "2026-12")], 8, rec(8))
    assert (await led.totals("g", "2026-11")).settled == 8
    assert (await led.totals("g", "2026-12")).settled == 0
    await led.close()


async def test_a_rolling_key_counts_its_window_and_spend_ages_out(ledger_factory):
    """A rolling key's totals and cap are its 12 buckets' sums; a bucket 12 or more back no longer counts."""
    led = ledger_factory()
    bucket = lambda i: rolling_key(300, 12, i)  # noqa: E731
    # Spend in bucket 100 (settled 300), 105 (reserved 200), and 99, outside the window ending at 111.
    await led.reserve("old", [("w", bucket(100))], 300, time.time() + 60)
    await led.settle("old", [("w", bucket(100))], 300, rec(300))
    await led.reserve("mid", [("w", bucket(105))], 200, time.time() + 60)
    await led.reserve("gone", [("w", bucket(99))], 1_000, time.time() + 60)
    assert await led.totals("w", bucket(111)) == (300, 200)  # buckets 100..111
    assert await led.totals("w", bucket(112)) == (0, 200)  # bucket 100 left the window
    b = await led.buckets("w", bucket(111))
    assert len(b) == 12 and b[0] == (300, 0) and b[5] == (0, 200) and b[11] == (0, 0)
    # The cap checks the window: 500 held in 100..111 under a 600 cap, so 100 fits and 101 more does not.
    r = await led.reserve("new", [("w", bucket(111)), ("g", "2026-11")], 100, time.time() + 60, caps=[600, None])
    assert r.admitted and r.totals[0] == (300, 300)
    r = await led.reserve("over", [("w", bucket(111))], 101, time.time() + 60, caps=[600])
    assert not r.admitted and r.totals[0] == (300, 300)
    # Its room comes back once bucket 100 leaves the window.
    r = await led.reserve("later", [("w", bucket(112))], 101, time.time() + 60, caps=[600])
    assert r.admitted and r.totals[0] == (0, 401)
    # Writes land in the bucket the request reserved in, as for any period.
    assert await led.settle("new", [("w", bucket(111)), ("g", "2026-11")], 90, rec(90))
    assert (await led.buckets("w", bucket(111)))[-1] == (90, 0)
    assert await led.totals("g", "2026-11") == (90, 0)
    assert await led.buckets("g", "2026-11") == [(90, 0)]
    await led.close()


async def test_retention_rolls_old_days_up_then_prunes_them(ledger_factory):
    """Reports over an old period answer the same after its settlements are gone; old alerts go; a second
    pass finds nothing more."""
    led = ledger_factory(fresh=True)
    now = time.time()
    old, recent = now - 500 * 86400, now - 86400
    keys = [("g", "2025-01"), ("t", "2025-01")]
    for i, ts in enumerate([old, old + 60, recent]):
        await led.reserve(f"p{i}", keys, 10, now + 60)
        await led.settle(f"p{i}", keys, 7 + i, SpendRecord(ts, "gpt-4o", "openai", 10, 5, 7 + i, "usage",
                                                         tool="codex", session="s-1"))
    await led.record_alert(old, "g", "2025-01", "80", 1, 2)
    await led.record_alert(recent, "g", "2026-11", "80", 1, 2)
    # An `every` bucket long past (SQLite deletes its row; Redis expires it).
    await led.reserve("e1", [("w", "E600:000000000001")], 5, now + 60)
    await led.settle("e1", [("w", "E600:000000000001")], 5, rec(5))
    before = (await led.spend(old - 2 * 86400, now + 1, True), await led.spend(old - 2 * 86400, now + 1, False))
    assert sum(a.requests for a in before[1]) == 4
    r = await led.prune(now - 400 * 86400, now - 30 * 86400, now)
    assert (r.days_rolled_up, r.settlements, r.alerts) == (1, 2, 1)
    assert r.buckets == (1 if ledger_factory.kind == "sqlite" else 0)
    assert (await led.spend(old - 2 * 86400, now + 1, True), await led.spend(old - 2 * 86400, now + 1, False)) == before
    assert [a.ts for a in await led.list_alerts(10)] == [recent]
    assert await led.prune(now - 400 * 86400, now - 30 * 86400, now) == (0, 0, 0, 0)
    assert (await led.spend(old - 86400, old + 86400, False))[0].cost == 15  # the rolled-up day alone
    await led.close()


async def test_a_token_budget_holds_settles_corrects_and_is_charged_in_tokens(ledger_factory):
    """A key with the TOKENS prefix counts tokens beside a dollar one, in the same atomic reservation."""
    led = ledger_factory(fresh=True)
    keys = [("g", "2026-11"), ("tok", "T:2026-11")]
    now = time.time()
    r = await led.reserve("a", keys, 100, now + 60, caps=[None, 1_000], tokens=600)
    assert r.admitted and r.totals == [(0, 100), (0, 600)]
    r = await led.reserve("b", keys, 100, now + 60, caps=[None, 1_000], tokens=500)
    assert not r.admitted and r.totals == [(0, 100), (0, 600)]  # 600 + 500 tokens > 1,000: nothing reserved
    assert await led.settle("a", keys, 70, SpendRecord(now, "gpt-4o", "openai", 300, 40, 70, "usage"))
    assert (await led.totals("g", "2026-11"), await led.totals("tok", "T:2026-11")) == ((70, 0), (340, 0))
    await led.reserve("c", keys, 50, now + 60, tokens=200)
    assert await led.release("c") == 2
    assert await led.totals("tok", "T:2026-11") == (340, 0)
    # Settled at the estimate, then corrected by the late usage: each budget by its own unit's difference.
    await led.reserve("d", keys, 80, now + 60, tokens=500)
    assert await led.settle("d", keys, 80, SpendRecord(now, "gpt-4o", "openai", 400, 100, 80, "estimate"))
    assert await led.totals("tok", "T:2026-11") == (840, 0)
    assert await led.correct("d", keys, 60, SpendRecord(now, "gpt-4o", "openai", 300, 50, 60, "usage"))
    assert (await led.totals("g", "2026-11"), await led.totals("tok", "T:2026-11")) == ((130, 0), (690, 0))
    # A forwarded request whose process died: the reaper charges what each budget held.
    await led.reserve("e", keys, 30, now - 1, tokens=250, forwarded=(now, ForwardNote("gpt-4o", "openai", "gpt-4o", 9)))
    assert await led.reap(now + 1) == ReapResult(0, 1, 30)
    assert (await led.totals("g", "2026-11"), await led.totals("tok", "T:2026-11")) == ((160, 0), (940, 0))
    # A rolling token window sums its buckets like a dollar one.
    await led.reserve("f", [("tw", "T:" + rolling_key(300, 12, 100))], 5, now + 60, tokens=70)
    assert await led.totals("tw", "T:" + rolling_key(300, 12, 105)) == (0, 70)
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
        r = await led.reserve(f"r{i}", [("g", "p")], limit // 50, time.time() + 60, caps=[limit])
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
        r = self.run(self.led.reserve(rid, [("g", "p")], amount, time.time() + 3600, caps=[cap]))
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


async def test_sqlite_upgrades_a_version_1_file_in_place(tmp_path):
    """A ledger made by the previous release keeps its spend; its leftover reservations (from a server that has
    stopped) are released, as the reaper would have done."""
    import sqlite3

    path = tmp_path / "v1.db"
    db = sqlite3.connect(path)
    db.executescript((Path(__file__).parent.parent / "fixtures/ledger_schema_v1.sql").read_text())
    db.executescript("""
        INSERT INTO totals VALUES ('global', '2026-11', 1500, 300), ('team', '2026-11', 900, 300);
        INSERT INTO reservations VALUES ('old', 'global 2026-11 300' || char(10) || 'team 2026-11 300', 9e12);
        INSERT INTO settlements VALUES ('s1', 1.0, 'gpt-4o', 'openai', 10, 5, 1500, 1400, 'usage',
                                        '["global","team"]', 0);
        PRAGMA user_version = 1;""")
    db.close()
    led = open_ledger("sqlite", path=str(path))
    assert await led.totals("global", "2026-11") == (1500, 0)
    assert await led.totals("team", "2026-11") == (900, 0)
    assert await led.reap(1e13) == ReapResult()  # the v1 reservation is gone, not reaped twice
    assert await led.settlement_count() == 1
    r = await led.reserve("new", [("global", "2026-11"), ("team", "2026-11")], 50, time.time() + 60,
                          caps=[2000, 2000])
    assert r.admitted and r.totals == [(1500, 50), (900, 50)]
    assert await led.settle("new", [("global", "2026-11"), ("team", "2026-11")], 40, rec(40))
    assert await led.totals("team", "2026-11") == (940, 0)
    await led.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 12
    db.close()
    assert await open_ledger("sqlite", path=str(path)).totals("global", "2026-11") == (1540, 0)  # reopens as v2


async def test_sqlite_forgets_row_ids_that_no_longer_name_a_row(tmp_path):
    """Ids are cached per process; if the rows they name are gone (file restored from an older copy), the
    ledger looks them up again instead of updating nothing."""
    import shutil

    path, copy = tmp_path / "l.db", tmp_path / "empty.db"
    await open_ledger("sqlite", path=str(copy)).close()  # a valid, empty file
    led = open_ledger("sqlite", path=str(path))
    keys = [("global", "p"), ("team", "p")]
    assert (await led.reserve("a", keys, 10, time.time() + 60)).admitted
    assert await led.settle("a", keys, 10, rec(10))
    led._db.close()  # type: ignore[attr-defined]
    shutil.copy(copy, path)
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"l.db{suffix}").unlink(missing_ok=True)
    import sqlite3

    led._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)  # type: ignore[attr-defined]
    led._db.execute("INSERT INTO totals (budget, period) VALUES ('x', 'q')")  # type: ignore[attr-defined]
    # The cached ids (1, 2) now name ('x', 'q') and nothing.
    assert (await led.reserve("b", keys, 5, time.time() + 60)).admitted
    assert await led.settle("b", keys, 4, rec(4))
    assert await led.totals("global", "p") == (4, 0) and await led.totals("team", "p") == (4, 0)
    assert await led.totals("x", "q") == (0, 0)
    await led.close()


BUDGETS = ("a", "b", "c")


class MultiBudgetModel(RuleBasedStateMachine):
    """Reservations over random sets of budgets (in random order) with per-budget caps, settled, released or
    settled after release, against an exact per-budget model: all or nothing, every time."""

    factory = None

    def __init__(self):
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.led = type(self).factory(fresh=True)
        self.settled = dict.fromkeys(BUDGETS, 0)
        self.held: dict[str, tuple[list[str], int]] = {}  # rid -> (budgets, amount)
        self.released: dict[str, list[str]] = {}
        self.settled_ids: set[str] = set()
        self.n = 0

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def reserved(self, b: str) -> int:
        return sum(amt for names, amt in self.held.values() if b in names)

    @rule(names=st.lists(st.sampled_from(BUDGETS), min_size=1, max_size=3, unique=True),
          amount=st.integers(0, 1000), caps=st.lists(st.one_of(st.none(), st.integers(0, 4000)), min_size=3,
                                                     max_size=3))
    def reserve(self, names, amount, caps):
        self.n += 1
        rid = f"r{self.n}"
        cap_of = dict(zip(BUDGETS, caps, strict=True))
        fits = all(cap_of[b] is None or self.settled[b] + self.reserved(b) + amount <= cap_of[b] for b in names)
        r = self.run(self.led.reserve(rid, [(b, "p") for b in names], amount, time.time() + 3600,
                                      caps=[cap_of[b] for b in names]))
        assert r.admitted == fits
        assert [tuple(t) for t in r.totals] == [
            (self.settled[b], self.reserved(b) + (amount if fits else 0)) for b in names]
        if fits:
            self.held[rid] = (names, amount)

    @rule(data=st.data(), cost=st.integers(0, 1000))
    def settle(self, data, cost):
        ids = sorted(self.held) + sorted(self.released) + sorted(self.settled_ids)
        if not ids:
            return
        rid = data.draw(st.sampled_from(ids))
        names = self.held[rid][0] if rid in self.held else self.released.get(rid, ["a"])
        applied = self.run(self.led.settle(rid, [(b, "p") for b in names], cost, rec(cost)))
        assert applied == (rid not in self.settled_ids)
        if applied:
            self.held.pop(rid, None)
            self.released.pop(rid, None)
            self.settled_ids.add(rid)
            for b in names:
                self.settled[b] += cost

    @rule(data=st.data())
    def release(self, data):
        if not self.held:
            return
        rid = data.draw(st.sampled_from(sorted(self.held)))
        names, _ = self.held.pop(rid)
        assert self.run(self.led.release(rid)) == len(names)
        self.released[rid] = names

    @invariant()
    def totals_match(self):
        for b in BUDGETS:
            t = self.run(self.led.totals(b, "p"))
            assert (t.settled, t.reserved) == (self.settled[b], self.reserved(b)), b

    def teardown(self):
        self.run(self.led.close())
        self.loop.close()


def test_multi_budget_state_machine_matches_exact_model(ledger_factory):
    MultiBudgetModel.factory = staticmethod(ledger_factory)
    test_case = MultiBudgetModel.TestCase
    test_case.settings = settings(max_examples=25, stateful_step_count=30, deadline=None)
    test_case().runTest()


async def test_sqlite_start_waits_for_another_worker_holding_the_file(tmp_path):
    """Workers start together: one creating or upgrading the file holds the write lock for a while; the others
    wait for it at start-up (not the request path's 250 ms) instead of failing to start."""
    import sqlite3
    import threading

    path = tmp_path / "l.db"
    blocker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    blocker.execute("PRAGMA journal_mode=WAL")
    blocker.execute("BEGIN IMMEDIATE")
    timer = threading.Timer(0.8, lambda: blocker.execute("COMMIT"))
    timer.start()
    t0 = time.monotonic()
    led = open_ledger("sqlite", path=str(path), timeout_ms=250)
    assert time.monotonic() - t0 >= 0.7
    assert (await led.reserve("a", [("g", "p")], 5, time.time() + 60)).admitted
    timer.join()
    blocker.close()
    await led.close()


async def test_calibration_sums_are_shared_decayed_and_kept(ledger_factory):
    from nexus_extproc.request.calibration import Calibrator

    a, b = ledger_factory(), ledger_factory()  # two replicas on one store
    now = 1_000_000.0
    r1, r2 = Calibrator(half_life_secs=3600), Calibrator(half_life_secs=3600)
    r1.observe("claude-sonnet-4-5", "approximation", "plain", ours=100, provider=90, tool_calls=0)
    r2.observe("claude-sonnet-4-5", "approximation", "plain", ours=100, provider=70, tool_calls=0)
    await r1.sync(a, now)
    await r2.sync(b, now)
    await r1.sync(a, now)
    for r in (r1, r2):  # each sees both samples: ratio (90 + 70) / 200
        assert r.adjust("claude-sonnet-4-5", "approximation", "plain", 1000, 0).prompt_tokens == 800
    stored = await a.merge_calibration({}, now + 3600, 3600)  # one half-life later: weight halves, ratio stays
    s = stored["claude-sonnet-4-5|approximation|plain"]
    assert s[3] == pytest.approx(1.0) and s[0] / s[1] == pytest.approx(0.8)
    await a.close()
    restarted = Calibrator(half_life_secs=3600)
    c = ledger_factory()
    await restarted.sync(c, now + 60)
    assert restarted.adjust("claude-sonnet-4-5", "approximation", "plain", 1000, 0).prompt_tokens == 800
    assert await restarted.reset(c) == 2  # the model's key and the all-models key
    await r2.sync(b, now + 61)
    assert not r2.adjust("claude-sonnet-4-5", "approximation", "plain", 1000, 0).calibrated
    await b.close()
    await c.close()


async def test_cluster_keeps_every_key_of_a_deployment_in_one_slot(request):
    """Multi-budget scripts stay atomic only if every key they touch is in one slot (one master)."""
    from redis.asyncio.cluster import RedisCluster

    url = request.getfixturevalue("redis_cluster_url")
    prefix = f"slot{uuid.uuid4().hex[:6]}"
    led = open_ledger("redis", url=url, key_prefix=prefix, timeout_ms=2000, cluster=True)
    items = [("global", "2026-12"), ("team-a", "2026-12"), ("daily", "2026-12-03")]
    assert (await led.reserve("a", items, 10, time.time() + 60)).admitted
    await led.mark_forwarded("a", time.time(), ForwardNote("gpt-4o", "openai", "gpt-4o", 5))
    assert await led.settle("a", items, 7, rec(7))
    await led.reserve("b", items, 10, time.time() - 1)
    await led.reap(time.time())
    await led.first_seen("global", "2026-12", time.time())
    await led.set_meta("k", "v")
    rc = RedisCluster.from_url(url, decode_responses=True)
    try:
        keys = [k async for k in rc.scan_iter(match="{" + prefix + "}*", target_nodes=RedisCluster.ALL_NODES)]
        assert len(keys) >= 6, keys
        slots = {rc.keyslot(k) for k in keys}
        assert len(slots) == 1, slots
    finally:
        await rc.aclose()
        await led.close()


async def test_redis_script_calls_of_one_tick_share_a_round_trip_and_survive_a_script_flush(redis_url):
    """The per-request scripts of concurrent requests go out as one pipeline (ledger/redis_batch.py); each is
    still its own atomic script, and a Redis that lost its scripts (restart, SCRIPT FLUSH) loads them again."""
    import uuid as _uuid

    from nexus_extproc.ledger.redis import RedisLedger

    # A generous store timeout: this is about batching, and 20 first calls that each reload a flushed script took
    # longer than the default 250 ms once in CI while the machine was loaded.
    led = RedisLedger(redis_url, key_prefix=f"b{_uuid.uuid4().hex[:8]}", timeout_ms=3000)
    assert led._batch is not None
    sizes: list[int] = []
    flush = led._batch._flush

    async def spy(batch):  # type: ignore[no-untyped-def]
        sizes.append(len(batch))
        await flush(batch)

    led._batch._flush = spy  # type: ignore[method-assign]
    key = [("global", "2026-12")]
    await led._r.script_flush()
    results = await asyncio.gather(*(led.reserve(f"r{i}", key, 10, time.time() + 60, caps=[150])
                                     for i in range(20)))
    assert sum(r.admitted for r in results) == 15  # the cap holds call by call inside the batch
    assert max(sizes) > 1 and sum(sizes) == 20, sizes
    assert (await led.totals("global", "2026-12")).reserved == 150
    await led.close()


async def test_alert_log_records_delivery_and_the_first_ack(ledger_factory):
    a = ledger_factory(fresh=True)
    i1 = await a.record_alert(1.0, "team/ml", "2026-12", "80", 800_000, 1_000_000)
    i2 = await a.record_alert(2.0, "global", "2026-12", "forecast", 10, 20)
    assert i2 > i1
    await a.alert_delivered(i1, "delivered", 2)
    got = await a.list_alerts(10)
    assert [(r.id, r.budget, r.threshold, r.delivery, r.attempts) for r in got] == [
        (i2, "global", "forecast", "pending", 0), (i1, "team/ml", "80", "delivered", 2)]
    first = await a.ack_alert(i1, "alice", 5.0)
    again = await a.ack_alert(i1, "bob", 6.0)
    assert first is not None and again is not None and (again.acked_by, again.acked_at) == ("alice", 5.0)
    assert await a.ack_alert(999_999, "alice", 7.0) is None
    assert len(await a.list_alerts(1)) == 1
    await a.append_audit([AuditRecord(8.0, "alice", "team/ml", "alert_ack", "", str(i1))])
    assert (await a.audit_log(1))[0].field == "alert_ack"
    await a.close()


async def test_instances_are_claimed_up_to_the_bound_per_period(ledger_factory):
    a, b = ledger_factory(), ledger_factory()  # two workers on one store
    got = await asyncio.gather(*(w.claim_instance("team", "2026-12", f"team/t{i}", 5)
                                 for i, w in zip(range(8), [a, b] * 4, strict=True)))
    assert sum(got) == 5  # atomic across both
    member = next(f"team/t{i}" for i, ok in enumerate(got) if ok)
    loser = next(f"team/t{i}" for i, ok in enumerate(got) if not ok)
    assert await a.claim_instance("team", "2026-12", member, 5)  # a member stays claimable
    assert not await b.claim_instance("team", "2026-12", loser, 5)
    assert await a.claim_instance("team", "2027-01", "team/new", 5)  # a new period starts empty
    await a.reserve("r", [(member, "2026-12")], 40, time.time() + 60)
    listed = dict(await b.instances("team", "2026-12"))
    assert len(listed) == 5 and listed[member].reserved == 40 and loser not in listed
    await a.close()
    await b.close()


async def test_sqlite_reports_never_queue_the_request_path(tmp_path):
    """A report that takes a second (months of settlements) runs on its own connection and thread: a reserve
    made meanwhile answers at once instead of waiting behind it past the store timeout."""
    led = open_ledger("sqlite", path=str(tmp_path / "l.db"), timeout_ms=250)

    def slow_report(db=None):
        time.sleep(1.0)
        return db.execute("SELECT COUNT(*) FROM settlements").fetchone()[0]

    report = asyncio.ensure_future(led._report(slow_report))
    await asyncio.sleep(0.1)
    r = await led.reserve("r1", [("g", "p")], 10, time.time() + 60)
    assert r.admitted and not report.done()  # answered while the report still runs (one thread: it would wait)
    assert await report == 0
    await led.settle("r1", [("g", "p")], 10, rec(10))
    assert [a.cost for a in await led.spend(0, time.time() + 10)] == [10]  # the report connection sees commits
    await led.close()


async def test_settlements_arriving_together_share_one_transaction(tmp_path):
    """SQLite group commit (issue 27 item 6): settles issued while one runs go in the next transaction together;
    each keeps its own answer (an id settled twice in the batch is False once, applied once)."""
    from nexus_extproc.ledger.sqlite import SqliteLedger

    led = SqliteLedger(str(tmp_path / "g.db"))
    batches: list[int] = []
    real = led._settle_many_sync

    def spy(items):
        batches.append(len(items))
        return real(items)
    led._settle_many_sync = spy  # type: ignore[method-assign]
    for i in range(20):
        await led.reserve(f"b{i}", [("g", "p")], 10, time.time() + 60)
    ids = [f"b{i}" for i in range(20)] + ["b3"]
    results = await asyncio.gather(*(led.settle(r, [("g", "p")], 7, rec(7)) for r in ids))
    assert results == [True] * 20 + [False]
    assert sum(batches) == 21 and len(batches) < 21, batches  # the first alone, the rest behind it together
    t = await led.totals("g", "p")
    assert (t.settled, t.reserved) == (140, 0)
    await led.close()
