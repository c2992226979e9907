"""SQLite ledger: the embedded default, safe for several `--workers` processes on one machine.

WAL mode lets readers run beside the single writer; every mutation is one `BEGIN IMMEDIATE` transaction,
which takes the write lock up front, so the limit check and the reservation cannot interleave with another
process's. `synchronous=NORMAL` (default) makes a committed settle survive a crash of the process (kill -9);
an OS crash or power loss can lose the last transactions since the WAL was synced. `FULL` syncs every commit.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from nexus_extproc.ledger.base import (
    AuditRecord,
    Ledger,
    ReserveItem,
    ReserveResult,
    SpendAgg,
    SpendRecord,
    StoreUnavailable,
    Totals,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS totals (
  budget TEXT NOT NULL, period TEXT NOT NULL,
  settled INTEGER NOT NULL DEFAULT 0, reserved INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY (budget, period));
-- One row per request: `items` holds "budget period amount" lines (one statement per request, not one per
-- budget, on the hot path; budget names and period keys never contain whitespace).
CREATE TABLE IF NOT EXISTS reservations (
  req_id TEXT PRIMARY KEY, items TEXT NOT NULL, expires_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS reservations_expiry ON reservations (expires_at);
CREATE TABLE IF NOT EXISTS settlements (
  req_id TEXT PRIMARY KEY, ts REAL NOT NULL, model TEXT NOT NULL, backend TEXT NOT NULL,
  input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL,
  cost INTEGER NOT NULL, estimate INTEGER NOT NULL, source TEXT NOT NULL,
  budgets TEXT NOT NULL DEFAULT '[]',  -- JSON array of the budgets it counted against
  avoided INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS periods (
  budget TEXT NOT NULL, period TEXT NOT NULL, first_seen REAL NOT NULL, PRIMARY KEY (budget, period));
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS settings (budget TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS audit (
  id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, actor TEXT NOT NULL, budget TEXT NOT NULL,
  field TEXT NOT NULL, old TEXT NOT NULL, new TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS settlements_ts ON settlements (ts);
"""


def _pack(items: list[ReserveItem]) -> str:
    return "\n".join(f"{i.budget} {i.period} {i.amount}" for i in items)


def _unpack(text: str) -> list[tuple[str, str, int]]:
    out = []
    for line in text.split("\n"):
        b, p, amt = line.split(" ")
        out.append((b, p, int(amt)))
    return out


def _json_names(names: dict[str, str]) -> str:
    """JSON array of budget names (for json_each in reports); names are [a-z0-9_.-] so need no escaping."""
    return '["' + '","'.join(sorted(names)) + '"]' if names else "[]"


SCHEMA_VERSION = 1


class LedgerSchemaError(RuntimeError):
    pass


class _AlreadySettled(Exception):
    pass


class _Refused(Exception):
    def __init__(self, result: ReserveResult) -> None:
        self.result = result


class SqliteLedger(Ledger):
    def __init__(self, path: str, timeout_ms: int = 250, synchronous: str = "NORMAL") -> None:
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, timeout=timeout_ms / 1000, isolation_level=None,
                                   check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if synchronous.upper() == 'FULL' else 'NORMAL'}")
        self._db.execute(f"PRAGMA busy_timeout={int(timeout_ms)}")
        self._migrate()
        self._known_rows: set[tuple[str, str]] = set()  # totals rows known to exist (never deleted)

    def _migrate(self) -> None:
        """Create the schema in a new file; refuse a file from another schema version instead of misreading it.
        Under the write lock, so workers starting together on a new file cannot see a half-created schema."""

        def tx(c: sqlite3.Cursor) -> int | None:
            version = c.execute("PRAGMA user_version").fetchone()[0]
            has_tables = c.execute("SELECT COUNT(*) FROM sqlite_master WHERE name = 'totals'").fetchone()[0]
            if version == 0 and not has_tables:
                sql = "\n".join(ln.split("--", 1)[0] for ln in SCHEMA.splitlines())  # comments may hold ';'
                for stmt in sql.split(";"):
                    if stmt.strip():
                        c.execute(stmt)
                c.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                return None
            return None if version == SCHEMA_VERSION else int(version)

        bad: int | None = self._write(tx)
        if bad is not None:
            raise LedgerSchemaError(f"ledger file has schema version {bad}, this server needs {SCHEMA_VERSION}; "
                                    "point store.path at a new file (the old one keeps its history)")

    def _write(self, fn, begin: bool = True):  # type: ignore[no-untyped-def]
        """Run `fn(cursor)` in one immediate transaction; a busy or broken store becomes StoreUnavailable."""
        cur = self._db.cursor()
        try:
            if begin:
                cur.execute("BEGIN IMMEDIATE")
            try:
                result = fn(cur)
            except _Refused:
                raise  # rolled back by the transaction body
            except _AlreadySettled:
                cur.execute("ROLLBACK")
                raise
            except BaseException:
                if begin and self._db.in_transaction:
                    cur.execute("ROLLBACK")
                raise
            if begin:
                cur.execute("COMMIT")
            return result
        except sqlite3.OperationalError as e:
            raise StoreUnavailable(f"sqlite: {e}") from None
        finally:
            cur.close()

    async def totals(self, budget: str, period: str) -> Totals:
        try:
            row = self._db.execute("SELECT settled, reserved FROM totals WHERE budget=? AND period=?",
                                   (budget, period)).fetchone()
        except sqlite3.OperationalError as e:
            raise StoreUnavailable(f"sqlite: {e}") from None
        return Totals(*row) if row else Totals(0, 0)

    async def reserve(self, req_id: str, items: list[ReserveItem], expires_at: float) -> ReserveResult:
        if len(items) == 1:
            return await self._reserve_one(req_id, items[0], expires_at)

        def tx(c: sqlite3.Cursor) -> ReserveResult:
            # Several budgets: update all in one statement and check every cap on what it returns; a violated
            # cap rolls the whole transaction back. BEGIN IMMEDIATE holds the write lock throughout, so nothing
            # interleaves, all or nothing.
            self._ensure_rows(c, items)
            keys = ",".join("(?,?)" for _ in items)
            args = [x for i in items for x in (i.budget, i.period)]
            if len({i.amount for i in items}) == 1:
                got = {(b, p): Totals(s_, r) for b, p, s_, r in c.execute(
                    f"UPDATE totals SET reserved = reserved + ? WHERE (budget, period) IN (VALUES {keys}) "
                    "RETURNING budget, period, settled, reserved", [items[0].amount, *args])}
            else:
                got = {}
                for i in items:
                    row = c.execute("UPDATE totals SET reserved = reserved + ? WHERE budget=? AND period=? "
                                    "RETURNING settled, reserved", (i.amount, i.budget, i.period)).fetchone()
                    got[(i.budget, i.period)] = Totals(*row)
            after = [got[(i.budget, i.period)] for i in items]
            if any(i.cap is not None and t.settled + t.reserved > i.cap for i, t in zip(items, after, strict=True)):
                c.execute("ROLLBACK")
                self._known_rows.difference_update((i.budget, i.period) for i in items)
                raise _Refused(ReserveResult(False, [Totals(t.settled, t.reserved - i.amount)
                                                     for i, t in zip(items, after, strict=True)]))
            c.execute("INSERT OR REPLACE INTO reservations VALUES (?,?,?)",
                      (req_id, _pack(items), expires_at))
            return ReserveResult(True, after)

        try:
            result: ReserveResult = self._write(tx)
        except _Refused as r:
            return r.result
        return result

    def _ensure_rows(self, c: sqlite3.Cursor, items: list[ReserveItem]) -> None:
        for it in items:
            if (it.budget, it.period) not in self._known_rows:
                c.execute("INSERT OR IGNORE INTO totals (budget, period) VALUES (?, ?)", (it.budget, it.period))
                self._known_rows.add((it.budget, it.period))

    async def _reserve_one(self, req_id: str, it: ReserveItem, expires_at: float) -> ReserveResult:
        def tx(c: sqlite3.Cursor) -> ReserveResult:
            self._ensure_rows(c, [it])
            # The cap check and the increment are one statement: nothing can interleave between them.
            row = c.execute(
                "UPDATE totals SET reserved = reserved + ?1 WHERE budget = ?2 AND period = ?3 "
                "AND (?4 IS NULL OR settled + reserved + ?1 <= ?4) RETURNING settled, reserved",
                (it.amount, it.budget, it.period, it.cap)).fetchone()
            if row is None:
                c.execute("ROLLBACK")  # also undoes a totals row created above
                self._known_rows.discard((it.budget, it.period))
                seen = c.execute("SELECT settled, reserved FROM totals WHERE budget=? AND period=?",
                                 (it.budget, it.period)).fetchone() or (0, 0)
                raise _Refused(ReserveResult(False, [Totals(*seen)]))
            c.execute("INSERT OR REPLACE INTO reservations VALUES (?,?,?)",
                      (req_id, _pack([it]), expires_at))
            return ReserveResult(True, [Totals(*row)])

        try:
            result: ReserveResult = self._write(tx)
        except _Refused as r:
            return r.result
        return result

    async def settle(self, req_id: str, items: list[tuple[str, str]], cost: int, record: SpendRecord) -> bool:
        def tx(c: sqlite3.Cursor) -> bool:
            row = c.execute("DELETE FROM reservations WHERE req_id=? RETURNING items", (req_id,)).fetchone()
            held = {b: (p, amt) for b, p, amt in _unpack(row[0])} if row else {}
            targets = {b: p for b, p in items}
            targets.update({b: p for b, (p, _) in held.items()})  # settle into the period it was reserved in
            try:
                c.execute("INSERT INTO settlements VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                          (req_id, record.ts, record.model, record.backend, record.input_tokens,
                           record.output_tokens, cost, record.estimate, record.source, _json_names(targets),
                           record.avoided))
            except sqlite3.IntegrityError:
                raise _AlreadySettled from None  # rolls back the DELETE above: idempotent
            amounts = {amt for _, amt in held.values()}
            if len(targets) > 1 and held.keys() == targets.keys() and len(amounts) == 1:
                # Common case with several budgets: one statement for all (the rows exist since the reserve).
                keys = ",".join("(?,?)" for _ in targets)
                c.execute(f"UPDATE totals SET settled = settled + ?, reserved = reserved - ? "
                          f"WHERE (budget, period) IN (VALUES {keys})",
                          [cost, amounts.pop(), *[x for b, p in targets.items() for x in (b, p)]])
            else:
                c.executemany("INSERT INTO totals (budget, period, settled, reserved) VALUES (?,?,?,0) "
                              "ON CONFLICT (budget, period) DO UPDATE SET settled = settled + excluded.settled, "
                              "reserved = reserved - ?",
                              [(b, p, cost, held.get(b, (p, 0))[1]) for b, p in targets.items()])
            return True

        try:
            applied: bool = self._write(tx)
        except _AlreadySettled:
            return False
        return applied

    def _unreserve(self, c: sqlite3.Cursor, rows: list[tuple[str]]) -> int:
        n = 0
        for (items,) in rows:
            held = _unpack(items)
            c.executemany("UPDATE totals SET reserved = reserved - ? WHERE budget=? AND period=?",
                          [(amt, b, p) for b, p, amt in held])
            n += len(held)
        return n

    async def release(self, req_id: str) -> int:
        def tx(c: sqlite3.Cursor) -> int:
            return self._unreserve(c, c.execute("DELETE FROM reservations WHERE req_id=? RETURNING items",
                                                (req_id,)).fetchall())

        n: int = self._write(tx)
        return n

    async def reap(self, now: float) -> int:
        def tx(c: sqlite3.Cursor) -> int:
            return self._unreserve(c, c.execute("DELETE FROM reservations WHERE expires_at < ? RETURNING items",
                                                (now,)).fetchall())

        n: int = self._write(tx)
        return n

    async def first_seen(self, budget: str, period: str, now: float) -> bool:
        def tx(c: sqlite3.Cursor) -> bool:
            c.execute("INSERT OR IGNORE INTO periods VALUES (?,?,?)", (budget, period, now))
            return c.rowcount == 1

        first: bool = self._write(tx)
        return first

    async def set_meta(self, key: str, value: str) -> None:
        self._write(lambda c: c.execute("INSERT OR REPLACE INTO meta VALUES (?,?)", (key, value)) and None)

    async def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    async def settlement_count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM settlements").fetchone()[0])

    async def get_settings(self, budget: str) -> dict[str, object] | None:
        row = self._db.execute("SELECT doc FROM settings WHERE budget=?", (budget,)).fetchone()
        return json.loads(row[0]) if row else None

    async def put_settings(self, budget: str, settings: dict[str, object], audit: list[AuditRecord]) -> None:
        def tx(c: sqlite3.Cursor) -> None:
            c.execute("INSERT OR REPLACE INTO settings VALUES (?,?)", (budget, json.dumps(settings)))
            c.executemany("INSERT INTO audit (ts, actor, budget, field, old, new) VALUES (?,?,?,?,?,?)",
                          [(a.ts, a.actor, a.budget, a.field, a.old, a.new) for a in audit])

        self._write(tx)

    async def audit_log(self, limit: int) -> list[AuditRecord]:
        rows = self._db.execute("SELECT ts, actor, budget, field, old, new FROM audit ORDER BY id DESC LIMIT ?",
                                (limit,)).fetchall()
        return [AuditRecord(*r) for r in rows]

    async def spend(self, start_ts: float, end_ts: float) -> list[SpendAgg]:
        rows = self._db.execute(
            "SELECT j.value, s.model, date(s.ts, 'unixepoch'), COUNT(*), SUM(s.input_tokens), "
            "SUM(s.output_tokens), SUM(s.cost), SUM(s.estimate), SUM(s.avoided) "
            "FROM settlements s, json_each(s.budgets) j WHERE s.ts >= ? AND s.ts < ? "
            "GROUP BY 1, 2, 3 ORDER BY 3, 1, 2", (start_ts, end_ts)).fetchall()
        return [SpendAgg(*r) for r in rows]

    async def close(self) -> None:
        self._db.close()


