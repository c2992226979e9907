"""SQLite ledger: the embedded default, safe for several `--workers` processes on one machine.

WAL mode lets readers run beside the single writer; every mutation is one `BEGIN IMMEDIATE` transaction,
which takes the write lock up front, so the limit check and the reservation cannot interleave with another
process's. `synchronous=NORMAL` (default) makes a committed settle survive a crash of the process (kill -9);
an OS crash or power loss can lose the last transactions since the WAL was synced. `FULL` syncs every commit.
"""

from __future__ import annotations

import functools
import json
import logging
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

log = logging.getLogger("nexus_extproc.ledger")

SCHEMA = """
-- `id` is a stable row id (rows are never deleted; VACUUM keeps an INTEGER PRIMARY KEY): the hot path reads and
-- updates a request's budgets by id, each a direct b-tree seek, with no IN list (SQLite builds an ephemeral
-- table for one on every execution) and no RETURNING (it materialises the returned rows first).
CREATE TABLE IF NOT EXISTS totals (
  id INTEGER PRIMARY KEY, budget TEXT NOT NULL, period TEXT NOT NULL,
  settled INTEGER NOT NULL DEFAULT 0, reserved INTEGER NOT NULL DEFAULT 0,
  UNIQUE (budget, period));
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


@functools.cache
def _select_by_ids(n: int) -> str:
    """One statement reading n rows by id, in the order given (UNION ALL arms run in order; the arm number makes
    the order explicit anyway)."""
    return " UNION ALL ".join(f"SELECT {k}, settled, reserved FROM totals WHERE id=?" for k in range(n))


# Version 1 had no `id` column in totals; it is upgraded in place (same rows, same totals).
MIGRATE_1_TO_2 = """
ALTER TABLE totals RENAME TO totals_v1;
CREATE TABLE totals (
  id INTEGER PRIMARY KEY, budget TEXT NOT NULL, period TEXT NOT NULL,
  settled INTEGER NOT NULL DEFAULT 0, reserved INTEGER NOT NULL DEFAULT 0,
  UNIQUE (budget, period));
INSERT INTO totals (budget, period, settled, reserved) SELECT budget, period, settled, reserved FROM totals_v1;
DROP TABLE totals_v1;
"""


SCHEMA_VERSION = 2


def _run_script(c: sqlite3.Cursor, script: str) -> None:
    """Statement by statement inside the caller's transaction (executescript would commit it)."""
    sql = "\n".join(ln.split("--", 1)[0] for ln in script.splitlines())  # comments may hold ';'
    for stmt in sql.split(";"):
        if stmt.strip():
            c.execute(stmt)


class LedgerSchemaError(RuntimeError):
    pass


class _AlreadySettled(Exception):
    pass


class _StaleIds(Exception):
    pass


class SqliteLedger(Ledger):
    def __init__(self, path: str, timeout_ms: int = 250, synchronous: str = "NORMAL") -> None:
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, timeout=timeout_ms / 1000, isolation_level=None,
                                   check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if synchronous.upper() == 'FULL' else 'NORMAL'}")
        self._db.execute(f"PRAGMA busy_timeout={int(timeout_ms)}")
        self._ids: dict[tuple[str, str], int] = {}  # (budget, period) -> totals.id, for rows committed
        self._new_ids: dict[tuple[str, str], int] = {}  # ids seen in the running transaction: kept on commit only
        self._migrate()

    def _migrate(self) -> None:
        """Create the schema in a new file; refuse a file from another schema version instead of misreading it.
        Under the write lock, so workers starting together on a new file cannot see a half-created schema."""

        def tx(c: sqlite3.Cursor) -> int | None:
            version = c.execute("PRAGMA user_version").fetchone()[0]
            has_tables = c.execute("SELECT COUNT(*) FROM sqlite_master WHERE name = 'totals'").fetchone()[0]
            if version == 0 and not has_tables:
                _run_script(c, SCHEMA)
            elif version == 1:
                _run_script(c, MIGRATE_1_TO_2)
                log.info("ledger schema upgraded", extra={"from_version": 1, "to_version": SCHEMA_VERSION})
            elif version != SCHEMA_VERSION:
                return int(version)
            c.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            return None

        bad: int | None = self._write(tx)
        if bad is not None:
            raise LedgerSchemaError(f"ledger file has schema version {bad}, this server needs {SCHEMA_VERSION}; "
                                    "point store.path at a new file (the old one keeps its history)")

    def _write(self, fn, begin: bool = True):  # type: ignore[no-untyped-def]
        """Run `fn(cursor)` in one immediate transaction; a busy or broken store becomes StoreUnavailable."""
        cur = self._db.cursor()
        self._new_ids.clear()
        try:
            if begin:
                cur.execute("BEGIN IMMEDIATE")
            try:
                result = fn(cur)
            except _AlreadySettled:
                cur.execute("ROLLBACK")
                raise
            except BaseException:
                if begin and self._db.in_transaction:
                    cur.execute("ROLLBACK")
                raise
            if begin:
                cur.execute("COMMIT")
            if self._new_ids:
                # Only ids of committed rows are remembered: a rolled-back insert's id could be handed out again
                # (to another budget or period) by the next insert.
                self._ids.update(self._new_ids)
            return result
        except sqlite3.OperationalError as e:
            raise StoreUnavailable(f"sqlite: {e}") from None
        finally:
            self._new_ids.clear()
            cur.close()

    def _row_ids(self, c: sqlite3.Cursor, keys: list[tuple[str, str]]) -> list[int]:
        """totals ids for (budget, period) keys, creating missing rows (at zero) inside the caller's transaction."""
        ids = self._ids
        out = []
        for key in keys:
            i = ids.get(key)
            if i is None:
                i = self._new_ids.get(key)
            if i is None:
                c.execute("INSERT OR IGNORE INTO totals (budget, period) VALUES (?, ?)", key)
                i = c.execute("SELECT id FROM totals WHERE budget=? AND period=?", key).fetchone()[0]
                self._new_ids[key] = i
            out.append(i)
        return out

    def _read(self, c: sqlite3.Cursor, ids: list[int]) -> list[Totals]:
        if len(ids) == 1:
            row = c.execute("SELECT settled, reserved FROM totals WHERE id=?", ids).fetchone()
            if row is None:
                raise _StaleIds
            return [Totals(*row)]
        rows = c.execute(_select_by_ids(len(ids)), ids).fetchall()
        if len(rows) != len(ids):
            raise _StaleIds
        out: list[Totals] = [Totals(0, 0)] * len(ids)
        for k, settled, reserved in rows:
            out[k] = Totals(settled, reserved)
        return out

    def _retrying(self, fn):  # type: ignore[no-untyped-def]
        """A cached id that no longer names a row (the file was replaced under us) is forgotten and looked up
        again, once: never an update that silently matches nothing."""
        try:
            return self._write(fn)
        except _StaleIds:
            self._ids.clear()
            return self._write(fn)

    async def totals(self, budget: str, period: str) -> Totals:
        try:
            row = self._db.execute("SELECT settled, reserved FROM totals WHERE budget=? AND period=?",
                                   (budget, period)).fetchone()
        except sqlite3.OperationalError as e:
            raise StoreUnavailable(f"sqlite: {e}") from None
        return Totals(*row) if row else Totals(0, 0)

    async def reserve(self, req_id: str, items: list[ReserveItem], expires_at: float) -> ReserveResult:
        def tx(c: sqlite3.Cursor) -> ReserveResult:
            # Read, check every cap, then write: BEGIN IMMEDIATE holds the write lock from the start, so nothing
            # interleaves between the check and the increments; a refusal writes nothing (all or nothing).
            ids = self._row_ids(c, [(i.budget, i.period) for i in items])
            before = self._read(c, ids)
            if any(i.cap is not None and t.settled + t.reserved + i.amount > i.cap
                   for i, t in zip(items, before, strict=True)):
                return ReserveResult(False, before)
            if len(ids) == 1:
                c.execute("UPDATE totals SET reserved = reserved + ? WHERE id=?", (items[0].amount, ids[0]))
            else:
                c.executemany("UPDATE totals SET reserved = reserved + ? WHERE id=?",
                              [(i.amount, r) for i, r in zip(items, ids, strict=True)])
            c.execute("INSERT OR REPLACE INTO reservations VALUES (?,?,?)", (req_id, _pack(items), expires_at))
            return ReserveResult(True, [Totals(t.settled, t.reserved + i.amount)
                                        for i, t in zip(items, before, strict=True)])

        result: ReserveResult = self._retrying(tx)
        return result

    async def settle(self, req_id: str, items: list[tuple[str, str]], cost: int, record: SpendRecord) -> bool:
        def tx(c: sqlite3.Cursor) -> bool:
            row = c.execute("SELECT items FROM reservations WHERE req_id=?", (req_id,)).fetchone()
            held = {b: (p, amt) for b, p, amt in _unpack(row[0])} if row else {}
            targets = {b: p for b, p in items}
            targets.update({b: p for b, (p, _) in held.items()})  # settle into the period it was reserved in
            try:
                c.execute("INSERT INTO settlements VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                          (req_id, record.ts, record.model, record.backend, record.input_tokens,
                           record.output_tokens, cost, record.estimate, record.source, _json_names(targets),
                           record.avoided))
            except sqlite3.IntegrityError:
                raise _AlreadySettled from None  # idempotent: a second settle changes nothing
            if row:
                c.execute("DELETE FROM reservations WHERE req_id=?", (req_id,))
            keys = list(targets.items())
            ids = self._row_ids(c, keys)
            c.executemany("UPDATE totals SET settled = settled + ?, reserved = reserved - ? WHERE id=?",
                          [(cost, held[b][1] if b in held else 0, i) for (b, _), i in zip(keys, ids, strict=True)])
            if c.rowcount != len(ids):
                raise _StaleIds
            return True

        try:
            applied: bool = self._retrying(tx)
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


