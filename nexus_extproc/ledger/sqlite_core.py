"""The SQLite ledger's connection and its machinery: the one-transaction writer, schema migration, the cached
row ids and key-set shapes, the WAL's bound. The work itself is in sqlite_spend.py (the request path) and
sqlite_control.py (settings, alerts, reports, calibration); sqlite_sync.py joins them.

Each mutation is one `BEGIN IMMEDIATE` transaction; rows are addressed by a cached integer id checked
against its key, and a key set's statements are built once (`_Shape`).
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from nexus_extproc.ledger.base import (
    TOKENS,
    Key,
    StoreOpenError,
    StoreUnavailable,
    Totals,
    window_of,
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
    MIGRATE_9_TO_10,
    MIGRATE_10_TO_11,
    MIGRATE_11_TO_12,
    SCHEMA,
    SCHEMA_VERSION,
    LedgerSchemaError,
    _release_v1_reservations,
    _run_script,
)
from nexus_extproc.memo import BoundedMemo
from nexus_extproc.ops import metrics

T = TypeVar("T")
# _MIGRATIONS[i] takes a file from schema version i + 1 to i + 2.
_MIGRATIONS = (MIGRATE_1_TO_2, MIGRATE_2_TO_3, MIGRATE_3_TO_4, MIGRATE_4_TO_5, MIGRATE_5_TO_6, MIGRATE_6_TO_7,
               MIGRATE_7_TO_8, MIGRATE_8_TO_9, MIGRATE_9_TO_10, MIGRATE_10_TO_11,
               MIGRATE_11_TO_12)

log = logging.getLogger("nexus_extproc.ledger")


# A row is addressed by its id (a direct b-tree seek) and checked against its key, so an id cached by a process
# can never silently name another row.
_ROW = "id=? AND budget=? AND period=?"
# A rolling window's older buckets, summed: a range over the (budget, period) index, bucket keys sort by time.
_OLDER = ("SELECT COALESCE(SUM(settled), 0), COALESCE(SUM(reserved), 0) FROM totals "
          "WHERE budget=? AND period>=? AND period<?")
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
    # Per rolling key (ledger.base.window_of): (its index in keys, budget, first older bucket's key, its own key).
    windows: tuple[tuple[int, str, str, str], ...] = ()
    tokens: tuple[bool, ...] = ()  # per key: a token budget's (base.TOKENS); empty when there is none

    def amounts(self, amount: int, tokens: int) -> list[int]:
        """Per key: what the request holds there (tokens in a token budget, micro-dollars elsewhere)."""
        return [tokens if t else amount for t in self.tokens] if self.tokens else [amount] * len(self.keys)

    @classmethod
    def of(cls, keys: tuple[Key, ...]) -> _Shape:
        names = sorted(b for b, _ in keys)  # [a-z0-9_.-]: no JSON escaping needed
        select = " UNION ALL ".join(f"SELECT {k}, settled, reserved FROM totals WHERE {_ROW}"
                                    for k in range(len(keys)))
        windows = tuple((k, b, w[1][0] if w[1] else p, p) for k, (b, p) in enumerate(keys)
                        if (w := window_of(p)) is not None)
        tokens = tuple(p.startswith(TOKENS) for _, p in keys)
        return cls(keys, "\n".join(f"{b} {p}" for b, p in keys),
                   '["' + '","'.join(names) + '"]' if names else "[]", select, windows, tokens if any(tokens) else ())


class _AlreadySettled(Exception):
    pass


class _StaleIds(Exception):
    pass


class SqliteCore:
    """One connection, used only from the ledger's one thread."""

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
            elif 1 <= version < SCHEMA_VERSION:
                if version == 1:
                    _release_v1_reservations(c)
                for script in _MIGRATIONS[version - 1:]:  # from its version up, in order
                    _run_script(c, script)
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
        if len(rows) == 1 and not sh.windows:
            return [Totals(rows[0][1], rows[0][2])]
        rows.sort()  # by arm number: key order
        out = [Totals(settled, reserved) for _, settled, reserved in rows]
        for k, budget, first, current in sh.windows:  # a rolling window: its older buckets count too
            s_, r = c.execute(_OLDER, (budget, first, current)).fetchone()
            out[k] = Totals(out[k].settled + s_, out[k].reserved + r)
        return out

    def _retrying(self, fn: Callable[[sqlite3.Cursor], T]) -> T:
        """A cached id that no longer names a row (the file was replaced under us) is forgotten and looked up
        again, once: never an update that silently matches nothing."""
        try:
            return self._write(fn)
        except _StaleIds:
            self._located.clear()
            return self._write(fn)

    def _totals_sync(self, budget: str, period: str) -> Totals:
        b = self._buckets_sync(budget, period)
        return b[0] if len(b) == 1 else Totals(sum(t.settled for t in b), sum(t.reserved for t in b))

    def _buckets_sync(self, budget: str, period: str) -> list[Totals]:
        """The key's totals; for a rolling key, each bucket of its window, oldest first (missing ones at zero)."""
        w = window_of(period)
        keys = [period] if w is None else [*w[1], period]
        try:
            rows = dict(((p, Totals(s_, r)) for p, s_, r in self._db.execute(
                "SELECT period, settled, reserved FROM totals WHERE budget=? AND period>=? AND period<=?",
                (budget, keys[0], period))))
        except sqlite3.OperationalError as e:
            raise StoreUnavailable(f"sqlite: {e}") from None
        return [rows.get(k, Totals(0, 0)) for k in keys]

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
