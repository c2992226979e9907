"""The request path's SQLite work, synchronous (on the ledger's one thread): reserve, settle (one
transaction for a batch, a savepoint each), correct an estimate, release, mark forwarded, reap, and the once-only
period marker."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from nexus_extproc.ledger.base import (
    TOKENS,
    ForwardNote,
    Key,
    ReapResult,
    ReserveResult,
    SpendRecord,
    Totals,
    record_tokens,
)
from nexus_extproc.ledger.sqlite_core import (
    _ROW,
    _SETTLEMENT_COLS,
    SqliteCore,
    _AlreadySettled,
    _Shape,
    _StaleIds,
)


class SpendSync(SqliteCore):
    def _reserve_sync(self, req_id: str, keys: Sequence[Key], amount: int, expires_at: float,
                      caps: Sequence[int | None] | None = None,
                      forwarded: tuple[float, ForwardNote] | None = None, tokens: int = 0) -> ReserveResult:
        sh = self._shape(keys)
        fwd_at, note = (forwarded[0], forwarded[1].pack()) if forwarded is not None else (None, None)
        amts = sh.amounts(amount, tokens)

        def tx(c: sqlite3.Cursor) -> ReserveResult:
            # Read, check every cap, then write: BEGIN IMMEDIATE holds the write lock from the start, so nothing
            # interleaves between the check and the increments; a refusal writes nothing (all or nothing).
            loc = self._locate(c, sh)
            before = self._read(c, sh, loc)
            if caps is not None and any(cap is not None and t.settled + t.reserved + a > cap
                                        for t, cap, a in zip(before, caps, amts, strict=True)):
                return ReserveResult(False, before)
            c.executemany(f"UPDATE totals SET reserved = reserved + ? WHERE {_ROW}",
                          [(a, *r) for a, r in zip(amts, loc.rows, strict=True)])
            c.execute("INSERT OR REPLACE INTO reservations VALUES (?,?,?,?,?,?,?)",
                      (req_id, amount, sh.text, expires_at, fwd_at, note, tokens))
            return ReserveResult(True, [Totals(s_, r + a) for (s_, r), a in zip(before, amts, strict=True)])

        result: ReserveResult = self._retrying(tx)
        return result

    def _settle_tx(self, c: sqlite3.Cursor, req_id: str, keys: Sequence[Key], cost: int,
                   record: SpendRecord) -> bool:
        sh = self._shape(keys)
        row = c.execute("SELECT amount, budgets, tokens FROM reservations WHERE req_id=?", (req_id,)).fetchone()
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
                amounts = [(row[2] if p.startswith(TOKENS) else row[0]) if b in held_names else 0
                           for b, p in target.keys]
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
            amounts = target.amounts(0, 0) if row is None else target.amounts(row[0], row[2])
        costs = target.amounts(cost, record_tokens(record))
        c.executemany(f"UPDATE totals SET settled = settled + ?, reserved = reserved - ? WHERE {_ROW}",
                      [(k, a, *r) for k, a, r in zip(costs, amounts, loc.rows, strict=True)])
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
            row = c.execute("SELECT cost, input_tokens + output_tokens FROM settlements WHERE req_id=? AND "
                            "source='estimate'", (req_id,)).fetchone()
            if row is None:
                return False
            c.execute("UPDATE settlements SET model=?, input_tokens=?, output_tokens=?, cost=?, source=?, "
                      "cache_read_tokens=?, avoided=? WHERE req_id=?",
                      (record.model, record.input_tokens, record.output_tokens, cost, record.source,
                       record.cache_read_tokens, record.avoided, req_id))
            sh = self._shape(keys)
            loc = self._locate(c, sh)
            deltas = sh.amounts(cost - row[0], record_tokens(record) - row[1])
            c.executemany(f"UPDATE totals SET settled = settled + ? WHERE {_ROW}",
                          [(d, *r) for d, r in zip(deltas, loc.rows, strict=True)])
            if c.rowcount != len(loc.rows):
                raise _StaleIds
            return True

        applied: bool = self._retrying(tx)
        return applied

    def _unreserve(self, c: sqlite3.Cursor, rows: list[tuple[int, str, int]]) -> int:
        n = 0
        for amount, text, tokens in rows:
            sh = self._shape_of_text(text)
            c.executemany("UPDATE totals SET reserved = reserved - ? WHERE budget=? AND period=?",
                          [(a, b, p) for a, (b, p) in zip(sh.amounts(amount, tokens), sh.keys, strict=True)])
            n += len(sh.keys)
        return n

    def _release_sync(self, req_id: str) -> int:
        def tx(c: sqlite3.Cursor) -> int:
            return self._unreserve(c, c.execute("DELETE FROM reservations WHERE req_id=? RETURNING amount, budgets, "
                                                "tokens", (req_id,)).fetchall())

        n: int = self._write(tx)
        return n

    def _mark_forwarded_sync(self, req_id: str, at: float, note: ForwardNote) -> None:
        self._write(lambda c: c.execute("UPDATE reservations SET forwarded_at=?, note=? WHERE req_id=?",
                                        (at, note.pack(), req_id)) and None)

    def _reap_sync(self, now: float) -> ReapResult:
        def tx(c: sqlite3.Cursor) -> ReapResult:
            rows = c.execute("DELETE FROM reservations WHERE expires_at < ? "
                             "RETURNING req_id, amount, budgets, forwarded_at, note, tokens", (now,)).fetchall()
            released = [(amount, text, tokens) for _, amount, text, fwd, _, tokens in rows if fwd is None]
            self._unreserve(c, released)
            charged = 0
            for req_id, amount, text, fwd, note, tokens in rows:
                if fwd is None:
                    continue
                sh = self._shape_of_text(text)
                n = ForwardNote.unpack(note)
                c.execute(f"INSERT OR IGNORE INTO settlements {_SETTLEMENT_COLS}",
                          (req_id, now, n.model, n.backend, n.input_tokens, 0, amount, amount, "reaped", sh.names,
                           0, n.model_requested, n.task, n.tags, "", 0, 0, 0, "", "", ""))
                once = c.rowcount == 1  # a settlement already recorded is not charged twice
                c.executemany("UPDATE totals SET settled = settled + ?, reserved = reserved - ? "
                              "WHERE budget=? AND period=?",
                              [(a if once else 0, a, b, p)
                               for a, (b, p) in zip(sh.amounts(amount, tokens), sh.keys, strict=True)])
                charged += amount if once else 0
            return ReapResult(len(released), len(rows) - len(released), charged)

        result: ReapResult = self._write(tx)
        return result

    def _first_seen_sync(self, budget: str, period: str, now: float) -> bool:
        def tx(c: sqlite3.Cursor) -> bool:
            c.execute("INSERT OR IGNORE INTO periods VALUES (?,?,?)", (budget, period, now))
            return c.rowcount == 1

        first: bool = self._write(tx)
        return first
