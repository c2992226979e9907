"""The SQLite ledger's work, synchronous: every call runs on the ledger's one thread (see sqlite.py).

Each mutation is one `BEGIN IMMEDIATE` transaction; rows are addressed by a cached integer id checked
against its key, and a key set's statements are built once (`_Shape`).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from nexus_extproc.ledger.base import (
    AlertRecord,
    AuditRecord,
    CalibrationSums,
    ForwardNote,
    Key,
    ReapResult,
    ReserveResult,
    SpendAgg,
    SpendRecord,
    StoreOpenError,
    StoreUnavailable,
    Totals,
    decay,
)
from nexus_extproc.ledger.one_thread import OneThread
from nexus_extproc.ledger.sqlite_schema import (
    MIGRATE_1_TO_2,
    MIGRATE_2_TO_3,
    MIGRATE_3_TO_4,
    MIGRATE_4_TO_5,
    MIGRATE_5_TO_6,
    MIGRATE_6_TO_7,
    MIGRATE_7_TO_8,
    MIGRATE_8_TO_9,
    SCHEMA,
    SCHEMA_VERSION,
    LedgerSchemaError,
    _release_v1_reservations,
    _run_script,
)
from nexus_extproc.memo import BoundedMemo
from nexus_extproc.ops import metrics

T = TypeVar("T")

log = logging.getLogger("nexus_extproc.ledger")


# A row is addressed by its id (a direct b-tree seek) and checked against its key, so an id cached by a process
# can never silently name another row.
_ROW = "id=? AND budget=? AND period=?"
# Named, not positional: a file upgraded in place has its added columns in the order they were added.
_SETTLEMENT_COLS = ("(req_id, ts, model, backend, input_tokens, output_tokens, cost, estimate, source, budgets, "
                    "avoided, model_requested, task, tags, team, cache_read_tokens, output_reserved, streamed, agent, "
                    "tool, session) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)")


@dataclass(frozen=True, slots=True)
class _Located:
    rows: list[tuple[int, str, str]]  # (id, budget, period) per key
    args: list[int | str]  # the same, flat, for _Shape.select


@dataclass(frozen=True, slots=True, eq=False)  # hashed by identity: one object per key set
class _Shape:
    """A set of (budget, period) keys as this ledger stores it, built once per distinct set: the hot path then
    does no per-budget string work."""

    keys: tuple[Key, ...]
    text: str  # reservations.budgets
    names: str  # settlements.budgets: JSON array of the names, for json_each in reports
    select: str  # reads the totals rows by id, in key order

    @classmethod
    def of(cls, keys: tuple[Key, ...]) -> _Shape:
        names = sorted(b for b, _ in keys)  # [a-z0-9_.-]: no JSON escaping needed
        select = " UNION ALL ".join(f"SELECT {k}, settled, reserved FROM totals WHERE {_ROW}"
                                    for k in range(len(keys)))
        return cls(keys, "\n".join(f"{b} {p}" for b, p in keys),
                   '["' + '","'.join(names) + '"]' if names else "[]", select)


class _AlreadySettled(Exception):
    pass


class _StaleIds(Exception):
    pass


class SyncSqlite:
    def __init__(self, path: str, timeout_ms: int = 250, synchronous: str = "NORMAL",
                 wal_max_bytes: int = 64 << 20) -> None:
        self._path = path
        self._wal_max_bytes = wal_max_bytes
        self._thread = OneThread("nexus-sqlite")
        # Reports read on a second connection and thread, opened on first use (sqlite.py `_report`).
        self._reader: OneThread | None = None
        self._reader_db: sqlite3.Connection | None = None
        try:
            if path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, timeout=timeout_ms / 1000, isolation_level=None,
                                       check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
        except (OSError, sqlite3.DatabaseError) as e:
            self._thread.shutdown()
            raise StoreOpenError(f"cannot open the SQLite ledger at {path}: {e}") from None
        # After each checkpoint that resets the WAL, cut the file back to this size instead of keeping its peak,
        # and checkpoint by itself at half the bound (SQLite's default, 1000 pages, can overshoot a small one).
        self._db.execute(f"PRAGMA journal_size_limit={int(wal_max_bytes)}")
        page = int(self._db.execute("PRAGMA page_size").fetchone()[0]) or 4096
        self._db.execute(f"PRAGMA wal_autocheckpoint={max(64, min(1000, wal_max_bytes // page // 2))}")
        self._db.execute(f"PRAGMA synchronous={'FULL' if synchronous.upper() == 'FULL' else 'NORMAL'}")
        self._timeout_ms = int(timeout_ms)
        self._db.execute(f"PRAGMA busy_timeout={self._timeout_ms}")
        self._located: dict[_Shape, _Located] = {}  # committed rows only
        self._pending: dict[_Shape, _Located] = {}  # located in the running transaction: kept on commit only
        self._shapes_by_text: dict[str, _Shape] = {}
        self._shapes: BoundedMemo[tuple[Key, ...], _Shape] = BoundedMemo(on_clear=self._forget_shapes)
        self._migrate()

    def _migrate(self) -> None:
        """Create the schema in a new file; refuse a file from another schema version instead of misreading it.
        Under the write lock, so workers starting together on a new file cannot see a half-created schema."""

        def tx(c: sqlite3.Cursor) -> int | None:
            version = c.execute("PRAGMA user_version").fetchone()[0]
            has_tables = c.execute("SELECT COUNT(*) FROM sqlite_master WHERE name = 'totals'").fetchone()[0]
            if version == 0 and not has_tables:
                _run_script(c, SCHEMA)
            elif version in (1, 2, 3, 4, 5, 6, 7, 8):
                if version == 1:
                    _release_v1_reservations(c)
                    _run_script(c, MIGRATE_1_TO_2)
                if version <= 2:
                    _run_script(c, MIGRATE_2_TO_3)
                if version <= 3:
                    _run_script(c, MIGRATE_3_TO_4)
                if version <= 4:
                    _run_script(c, MIGRATE_4_TO_5)
                if version <= 5:
                    _run_script(c, MIGRATE_5_TO_6)
                if version <= 6:
                    _run_script(c, MIGRATE_6_TO_7)
                if version <= 7:
                    _run_script(c, MIGRATE_7_TO_8)
                _run_script(c, MIGRATE_8_TO_9)
                log.info("ledger schema upgraded", extra={"from_version": version, "to_version": SCHEMA_VERSION})
            elif version != SCHEMA_VERSION:
                return int(version)
            c.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            return None

        # Start-up only: wait up to 10 s (not the request path's timeout) for another worker creating or
        # upgrading the same file.
        self._db.execute("PRAGMA busy_timeout=10000")
        try:
            bad: int | None = self._write(tx)
        finally:
            self._db.execute(f"PRAGMA busy_timeout={self._timeout_ms}")
        if bad is not None:
            raise LedgerSchemaError(f"ledger file has schema version {bad}, this server needs {SCHEMA_VERSION}; "
                                    "point store.path at a new file (the old one keeps its history)")

    def _write(self, fn: Callable[[sqlite3.Cursor], T], begin: bool = True) -> T:
        """Run `fn(cursor)` in one immediate transaction; a busy or broken store becomes StoreUnavailable."""
        cur = self._db.cursor()
        self._pending.clear()
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
            if self._pending:
                # Only committed rows are remembered: a rolled-back insert's id could be handed out again (to
                # another budget or period) by the next insert.
                self._located.update(self._pending)
            return result
        except sqlite3.OperationalError as e:
            raise StoreUnavailable(f"sqlite: {e}") from None
        finally:
            self._pending.clear()
            cur.close()

    def _shape(self, keys: Sequence[Key]) -> _Shape:
        t = keys if type(keys) is tuple else tuple(keys)
        sh = self._shapes.get(t)
        if sh is None:
            sh = self._shapes.put(t, self._shapes_by_text.setdefault((new := _Shape.of(t)).text, new))
        return sh

    def _forget_shapes(self) -> None:
        self._shapes_by_text.clear()
        self._located.clear()

    def _shape_of_text(self, text: str) -> _Shape:
        sh = self._shapes_by_text.get(text)
        if sh is None:
            sh = self._shape(tuple((b, p) for b, p in (line.split(" ") for line in text.split("\n"))))
        return sh

    def _locate(self, c: sqlite3.Cursor, sh: _Shape) -> _Located:
        """Where the shape's totals rows are, creating missing ones (at zero) inside the caller's transaction."""
        loc = self._located.get(sh)
        if loc is None:
            rows = []
            for key in sh.keys:
                c.execute("INSERT OR IGNORE INTO totals (budget, period) VALUES (?, ?)", key)
                rows.append((c.execute("SELECT id FROM totals WHERE budget=? AND period=?", key).fetchone()[0], *key))
            loc = self._pending[sh] = _Located(rows, [x for r in rows for x in r])
        return loc

    @staticmethod
    def _read(c: sqlite3.Cursor, sh: _Shape, loc: _Located) -> list[Totals]:
        rows = c.execute(sh.select, loc.args).fetchall()
        if len(rows) != len(sh.keys):
            raise _StaleIds
        if len(rows) == 1:
            return [Totals(rows[0][1], rows[0][2])]
        rows.sort()  # by arm number: key order
        return [Totals(settled, reserved) for _, settled, reserved in rows]

    def _retrying(self, fn: Callable[[sqlite3.Cursor], T]) -> T:
        """A cached id that no longer names a row (the file was replaced under us) is forgotten and looked up
        again, once: never an update that silently matches nothing."""
        try:
            return self._write(fn)
        except _StaleIds:
            self._located.clear()
            return self._write(fn)

    def _totals_sync(self, budget: str, period: str) -> Totals:
        try:
            row = self._db.execute("SELECT settled, reserved FROM totals WHERE budget=? AND period=?",
                                   (budget, period)).fetchone()
        except sqlite3.OperationalError as e:
            raise StoreUnavailable(f"sqlite: {e}") from None
        return Totals(*row) if row else Totals(0, 0)

    def _reserve_sync(self, req_id: str, keys: Sequence[Key], amount: int, expires_at: float,
                      caps: Sequence[int | None] | None = None,
                      forwarded: tuple[float, ForwardNote] | None = None) -> ReserveResult:
        sh = self._shape(keys)
        fwd_at, note = (forwarded[0], forwarded[1].pack()) if forwarded is not None else (None, None)

        def tx(c: sqlite3.Cursor) -> ReserveResult:
            # Read, check every cap, then write: BEGIN IMMEDIATE holds the write lock from the start, so nothing
            # interleaves between the check and the increments; a refusal writes nothing (all or nothing).
            loc = self._locate(c, sh)
            before = self._read(c, sh, loc)
            if caps is not None and any(cap is not None and t.settled + t.reserved + amount > cap
                                        for t, cap in zip(before, caps, strict=True)):
                return ReserveResult(False, before)
            c.executemany(f"UPDATE totals SET reserved = reserved + ? WHERE {_ROW}", [(amount, *r) for r in loc.rows])
            c.execute("INSERT OR REPLACE INTO reservations VALUES (?,?,?,?,?,?)",
                      (req_id, amount, sh.text, expires_at, fwd_at, note))
            return ReserveResult(True, [Totals(s_, r + amount) for s_, r in before])

        result: ReserveResult = self._retrying(tx)
        return result

    def _settle_tx(self, c: sqlite3.Cursor, req_id: str, keys: Sequence[Key], cost: int,
                   record: SpendRecord) -> bool:
        sh = self._shape(keys)
        row = c.execute("SELECT amount, budgets FROM reservations WHERE req_id=?", (req_id,)).fetchone()
        if row is None and record.source == "estimate":
            raise _AlreadySettled  # settled or released elsewhere (base.SpendLedger.settle)
        target: _Shape = sh
        amounts: list[int] | None = None
        if row is not None:
            held = sh if row[1] == sh.text else self._shape_of_text(row[1])
            if held is not sh:
                # Settle into the periods it was reserved in; budgets not held get no reserved decrement.
                merged = dict(sh.keys)
                merged.update(held.keys)
                target = self._shape(tuple(merged.items()))
                held_names = {b for b, _ in held.keys}
                amounts = [row[0] if b in held_names else 0 for b, _ in target.keys]
        try:
            c.execute(f"INSERT INTO settlements {_SETTLEMENT_COLS}",
                      (req_id, record.ts, record.model, record.backend, record.input_tokens,
                       record.output_tokens, cost, record.estimate, record.source, target.names, record.avoided,
                       record.model_requested, record.task, record.tags, record.team, record.cache_read_tokens,
                       record.output_reserved, int(record.streamed), record.agent, record.tool, record.session))
        except sqlite3.IntegrityError:
            raise _AlreadySettled from None  # idempotent: a second settle changes nothing
        if row is not None:
            c.execute("DELETE FROM reservations WHERE req_id=?", (req_id,))
        loc = self._locate(c, target)
        if amounts is None:
            amounts = [0 if row is None else row[0]] * len(loc.rows)
        c.executemany(f"UPDATE totals SET settled = settled + ?, reserved = reserved - ? WHERE {_ROW}",
                      [(cost, a, *r) for a, r in zip(amounts, loc.rows, strict=True)])
        if c.rowcount != len(loc.rows):
            raise _StaleIds
        return True

    def _settle_sync(self, req_id: str, keys: Sequence[Key], cost: int, record: SpendRecord) -> bool:
        return self._settle_many_sync([(req_id, keys, cost, record)])[0]

    def _settle_many_sync(self, items: Sequence[tuple[str, Sequence[Key], int, SpendRecord]]) -> list[bool]:
        """Settlements that queued together, in one transaction (one fsync-able commit instead of one each): a
        savepoint per settlement, so one already settled (False) leaves the others applied."""
        def tx(c: sqlite3.Cursor) -> list[bool]:
            out = []
            for req_id, keys, cost, record in items:
                c.execute("SAVEPOINT s")
                try:
                    out.append(self._settle_tx(c, req_id, keys, cost, record))
                except _AlreadySettled:
                    c.execute("ROLLBACK TO s")
                    out.append(False)
                c.execute("RELEASE s")
            return out

        result: list[bool] = self._retrying(tx)
        return result

    def _correct_sync(self, req_id: str, keys: Sequence[Key], cost: int, record: SpendRecord) -> bool:
        def tx(c: sqlite3.Cursor) -> bool:
            row = c.execute("SELECT cost FROM settlements WHERE req_id=? AND source='estimate'", (req_id,)).fetchone()
            if row is None:
                return False
            c.execute("UPDATE settlements SET model=?, input_tokens=?, output_tokens=?, cost=?, source=?, "
                      "cache_read_tokens=?, avoided=? WHERE req_id=?",
                      (record.model, record.input_tokens, record.output_tokens, cost, record.source,
                       record.cache_read_tokens, record.avoided, req_id))
            loc = self._locate(c, self._shape(keys))
            c.executemany(f"UPDATE totals SET settled = settled + ? WHERE {_ROW}",
                          [(cost - row[0], *r) for r in loc.rows])
            if c.rowcount != len(loc.rows):
                raise _StaleIds
            return True

        applied: bool = self._retrying(tx)
        return applied

    def _unreserve(self, c: sqlite3.Cursor, rows: list[tuple[int, str]]) -> int:
        n = 0
        for amount, text in rows:
            sh = self._shape_of_text(text)
            c.executemany("UPDATE totals SET reserved = reserved - ? WHERE budget=? AND period=?",
                          [(amount, b, p) for b, p in sh.keys])
            n += len(sh.keys)
        return n

    def _release_sync(self, req_id: str) -> int:
        def tx(c: sqlite3.Cursor) -> int:
            return self._unreserve(c, c.execute("DELETE FROM reservations WHERE req_id=? RETURNING amount, budgets",
                                                (req_id,)).fetchall())

        n: int = self._write(tx)
        return n

    def _mark_forwarded_sync(self, req_id: str, at: float, note: ForwardNote) -> None:
        self._write(lambda c: c.execute("UPDATE reservations SET forwarded_at=?, note=? WHERE req_id=?",
                                        (at, note.pack(), req_id)) and None)

    def _reap_sync(self, now: float) -> ReapResult:
        def tx(c: sqlite3.Cursor) -> ReapResult:
            rows = c.execute("DELETE FROM reservations WHERE expires_at < ? "
                             "RETURNING req_id, amount, budgets, forwarded_at, note", (now,)).fetchall()
            released = [(amount, text) for _, amount, text, fwd, _ in rows if fwd is None]
            self._unreserve(c, released)
            charged = 0
            for req_id, amount, text, fwd, note in rows:
                if fwd is None:
                    continue
                sh = self._shape_of_text(text)
                n = ForwardNote.unpack(note)
                c.execute(f"INSERT OR IGNORE INTO settlements {_SETTLEMENT_COLS}",
                          (req_id, now, n.model, n.backend, n.input_tokens, 0, amount, amount, "reaped", sh.names,
                           0, n.model_requested, n.task, n.tags, "", 0, 0, 0, "", "", ""))
                settle = amount if c.rowcount == 1 else 0  # a settlement already recorded is not charged twice
                c.executemany("UPDATE totals SET settled = settled + ?, reserved = reserved - ? "
                              "WHERE budget=? AND period=?", [(settle, amount, b, p) for b, p in sh.keys])
                charged += settle
            return ReapResult(len(released), len(rows) - len(released), charged)

        result: ReapResult = self._write(tx)
        return result

    def _first_seen_sync(self, budget: str, period: str, now: float) -> bool:
        def tx(c: sqlite3.Cursor) -> bool:
            c.execute("INSERT OR IGNORE INTO periods VALUES (?,?,?)", (budget, period, now))
            return c.rowcount == 1

        first: bool = self._write(tx)
        return first

    def _set_meta_sync(self, key: str, value: str) -> None:
        self._write(lambda c: c.execute("INSERT OR REPLACE INTO meta VALUES (?,?)", (key, value)) and None)

    def _get_meta_sync(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def _settlement_count_sync(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM settlements").fetchone()[0])

    def _get_settings_sync(self, budget: str) -> dict[str, object] | None:
        row = self._db.execute("SELECT doc FROM settings WHERE budget=?", (budget,)).fetchone()
        return json.loads(row[0]) if row else None

    def _put_settings_sync(self, budget: str, settings: dict[str, object] | None,
                           audit: list[AuditRecord]) -> None:
        def tx(c: sqlite3.Cursor) -> None:
            if settings is None:
                c.execute("DELETE FROM settings WHERE budget=?", (budget,))
            else:
                c.execute("INSERT OR REPLACE INTO settings VALUES (?,?)", (budget, json.dumps(settings)))
            c.executemany("INSERT INTO audit (ts, actor, budget, field, old, new) VALUES (?,?,?,?,?,?)",
                          [(a.ts, a.actor, a.budget, a.field, a.old, a.new) for a in audit])

        self._write(tx)

    def _record_alert_sync(self, ts: float, budget: str, period: str, threshold: str, spend: int,
                           limit: int) -> int:
        def tx(c: sqlite3.Cursor) -> int:
            c.execute("INSERT INTO alerts (ts, budget, period, threshold, spend, lim) VALUES (?,?,?,?,?,?)",
                      (ts, budget, period, threshold, spend, limit))
            return int(c.lastrowid or 0)

        alert_id: int = self._write(tx)
        return alert_id

    def _alert_delivered_sync(self, alert_id: int, delivery: str, attempts: int) -> None:
        self._write(lambda c: c.execute("UPDATE alerts SET delivery=?, attempts=? WHERE id=?",
                                        (delivery, attempts, alert_id)) and None)

    _ALERT_COLS = "id, ts, budget, period, threshold, spend, lim, delivery, attempts, acked_by, acked_at"

    def _list_alerts_sync(self, limit: int, db: sqlite3.Connection | None = None) -> list[AlertRecord]:
        rows = (db or self._db).execute(f"SELECT {self._ALERT_COLS} FROM alerts ORDER BY id DESC LIMIT ?",
                                (limit,)).fetchall()
        return [AlertRecord(*r) for r in rows]

    def _ack_alert_sync(self, alert_id: int, actor: str, at: float) -> AlertRecord | None:
        def tx(c: sqlite3.Cursor) -> AlertRecord | None:
            c.execute("UPDATE alerts SET acked_by=?, acked_at=? WHERE id=? AND acked_by IS NULL",
                      (actor, at, alert_id))
            row = c.execute(f"SELECT {self._ALERT_COLS} FROM alerts WHERE id=?", (alert_id,)).fetchone()
            return AlertRecord(*row) if row else None

        rec: AlertRecord | None = self._write(tx)
        return rec

    def _claim_instance_sync(self, parent: str, period: str, name: str, max_instances: int) -> bool:
        def tx(c: sqlite3.Cursor) -> bool:
            if c.execute("SELECT 1 FROM instances WHERE parent=? AND period=? AND name=?",
                         (parent, period, name)).fetchone():
                return True
            n = c.execute("SELECT COUNT(*) FROM instances WHERE parent=? AND period=?", (parent, period)).fetchone()[0]
            if n >= max_instances:
                return False
            c.execute("INSERT INTO instances VALUES (?,?,?)", (parent, period, name))
            return True

        ok: bool = self._write(tx)
        return ok

    def _instances_sync(self, parent: str, period: str,
                        db: sqlite3.Connection | None = None) -> list[tuple[str, Totals]]:
        rows = (db or self._db).execute(
            "SELECT i.name, COALESCE(t.settled, 0), COALESCE(t.reserved, 0) FROM instances i LEFT JOIN totals t "
            "ON t.budget = i.name AND t.period = i.period WHERE i.parent=? AND i.period=? ORDER BY i.name",
            (parent, period)).fetchall()
        return [(r[0], Totals(int(r[1]), int(r[2]))) for r in rows]

    def _all_settings_sync(self) -> dict[str, dict[str, object]]:
        return {b: json.loads(doc) for b, doc in self._db.execute("SELECT budget, doc FROM settings").fetchall()}

    def _append_audit_sync(self, audit: list[AuditRecord]) -> None:
        self._write(lambda c: c.executemany(
            "INSERT INTO audit (ts, actor, budget, field, old, new) VALUES (?,?,?,?,?,?)",
            [(a.ts, a.actor, a.budget, a.field, a.old, a.new) for a in audit]) and None)

    def _audit_log_sync(self, limit: int, db: sqlite3.Connection | None = None) -> list[AuditRecord]:
        rows = (db or self._db).execute("SELECT ts, actor, budget, field, old, new FROM audit ORDER BY id DESC LIMIT ?",
                                (limit,)).fetchall()
        return [AuditRecord(*r) for r in rows]

    def _spend_sync(self, start_ts: float, end_ts: float, per_budget: bool = True,
                    db: sqlite3.Connection | None = None) -> list[SpendAgg]:
        budget, source = ("j.value", "settlements s, json_each(s.budgets) j") if per_budget else \
            ("''", "settlements s")
        rows = (db or self._db).execute(
            f"SELECT {budget}, s.model, date(s.ts, 'unixepoch'), COUNT(*), SUM(s.input_tokens), "
            "SUM(s.output_tokens), SUM(s.cost), SUM(s.estimate), SUM(s.avoided), s.model_requested, "
            "SUM(CASE WHEN s.source = 'reaped' THEN s.cost ELSE 0 END), s.backend, s.task, s.tags, "
            "SUM(s.cache_read_tokens), SUM(s.output_reserved), SUM(s.streamed), s.team, s.agent, s.tool, s.session "
            f"FROM {source} WHERE s.ts >= ? AND s.ts < ? "
            "GROUP BY 1, 2, 3, 10, 12, 13, 14, 18, 19, 20, 21 ORDER BY 3, 1, 2, 10, 12, 13, 14, 18, 19, 20, 21",
            (start_ts, end_ts)).fetchall()
        return [SpendAgg(*r) for r in rows]

    def _merge_calibration_sync(self, deltas: dict[str, CalibrationSums], now: float,
                                half_life_s: float) -> dict[str, CalibrationSums]:
        def tx(c: sqlite3.Cursor) -> None:
            for key, d in deltas.items():
                row = c.execute("SELECT provider, ours, tool_calls, n, updated FROM calibration WHERE key=?",
                                (key,)).fetchone()
                old = decay(row[:4], now - row[4], half_life_s) if row else (0.0, 0.0, 0.0, 0.0)
                c.execute("INSERT OR REPLACE INTO calibration VALUES (?,?,?,?,?,?)",
                          (key, *(a + b for a, b in zip(old, d, strict=True)), now))

        if deltas:
            self._write(tx)
        rows = self._db.execute("SELECT key, provider, ours, tool_calls, n, updated FROM calibration").fetchall()
        return {r[0]: decay(r[1:5], now - r[5], half_life_s) for r in rows}

    def _reset_calibration_sync(self) -> int:
        n: int = self._write(lambda c: c.execute("DELETE FROM calibration").rowcount)
        return n

    def _checkpoint_sync(self, force: bool) -> int:
        """Fold the WAL back into the database and cut the file to zero when it has grown past its bound (or on
        a full disk): an unbounded WAL is what fills a small volume, and a truncated one gives the space back."""
        if self._path == ":memory:":
            return 0
        try:
            size = os.path.getsize(self._path + "-wal")
        except OSError:
            return 0
        if not force and size <= self._wal_max_bytes:
            return 0
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.DatabaseError as e:
            log.warning("WAL checkpoint failed", extra={"error": str(e)})
            return 0
        metrics.wal_checkpoints.inc()
        return size

    def _close_sync(self) -> None:
        self._db.close()
