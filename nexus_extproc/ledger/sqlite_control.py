"""The SQLite ledger's control and report work, synchronous (on the ledger's one thread, reports on their own
connection): metadata, budget settings and their audit, alerts, distinct-value instances, spend reports,
shared calibration."""

from __future__ import annotations

import json
import sqlite3
import time

from nexus_extproc.ledger.base import (
    AlertRecord,
    AuditRecord,
    CalibrationSums,
    PruneResult,
    SpendAgg,
    Totals,
    decay,
    old_window_key,
)
from nexus_extproc.ledger.sqlite_core import SqliteCore


class ControlSync(SqliteCore):
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

    def _claim_instance_sync(self, parent: str, period: str, name: str, max_instances: int,
                             idle_ttl_s: int = 0) -> bool:
        now = time.time()

        def tx(c: sqlite3.Cursor) -> bool:
            if idle_ttl_s:
                c.execute("DELETE FROM instances WHERE parent=? AND period=? AND last_seen<?",
                          (parent, period, now - idle_ttl_s))
            if c.execute("SELECT 1 FROM instances WHERE parent=? AND period=? AND name=?",
                         (parent, period, name)).fetchone():
                if idle_ttl_s:
                    c.execute("UPDATE instances SET last_seen=? WHERE parent=? AND period=? AND name=?",
                              (now, parent, period, name))
                return True
            n = c.execute("SELECT COUNT(*) FROM instances WHERE parent=? AND period=?", (parent, period)).fetchone()[0]
            if n >= max_instances:
                return False
            c.execute("INSERT INTO instances (parent, period, name, last_seen) VALUES (?,?,?,?)",
                      (parent, period, name, now))
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

    @staticmethod
    def _aggregate(per_budget: bool) -> str:
        """Settlements at the reports' grain, in SpendAgg's field order (and the rollup table's columns)."""
        budget, source = ("j.value", "settlements s, json_each(s.budgets) j") if per_budget else \
            ("''", "settlements s")
        return (f"SELECT {budget}, s.model, date(s.ts, 'unixepoch'), COUNT(*), SUM(s.input_tokens), "
                "SUM(s.output_tokens), SUM(s.cost), SUM(s.estimate), SUM(s.avoided), s.model_requested, "
                "SUM(CASE WHEN s.source = 'reaped' THEN s.cost ELSE 0 END), s.backend, s.task, s.tags, "
                "SUM(s.cache_read_tokens), SUM(s.output_reserved), SUM(s.streamed), s.team, s.agent, s.tool, "
                f"s.session FROM {source} WHERE s.ts >= ? AND s.ts < ? "
                "GROUP BY 1, 2, 3, 10, 12, 13, 14, 18, 19, 20, 21")

    def _spend_sync(self, start_ts: float, end_ts: float, per_budget: bool = True,
                    db: sqlite3.Connection | None = None) -> list[SpendAgg]:
        conn = db or self._db
        rows = conn.execute(self._aggregate(per_budget), (start_ts, end_ts)).fetchall()
        # Days that retention rolled up (their settlements are gone): the same grain, from the aggregates.
        rows += conn.execute(
            "SELECT budget, model, day, requests, input_tokens, output_tokens, cost, estimate, avoided, "
            "model_requested, reaped, backend, task, tags, cache_read_tokens, output_reserved, streamed, team, agent, "
            "tool, session FROM rollup WHERE per_budget=? AND day>=date(?, 'unixepoch') AND day<=date(?, 'unixepoch')"
            " AND CAST(strftime('%s', day) AS REAL) < ?", (int(per_budget), start_ts, end_ts, end_ts)).fetchall()
        rows.sort(key=lambda r: (r[2], r[0], r[1], r[9], r[11], r[12], r[13], r[17], r[18], r[19], r[20]))
        return [SpendAgg(*r) for r in rows]

    def _prune_sync(self, settlements_before: float, alerts_before: float, now: float) -> PruneResult:
        cutoff = int(settlements_before // 86400) * 86400  # whole UTC days only

        def tx(c: sqlite3.Cursor) -> PruneResult:
            days = c.execute("SELECT COUNT(DISTINCT date(ts, 'unixepoch')) FROM settlements WHERE ts < ?",
                             (cutoff,)).fetchone()[0]
            for per_budget in (1, 0):
                c.execute(f"INSERT INTO rollup SELECT {per_budget}, * FROM ({self._aggregate(bool(per_budget))})",
                          (0, cutoff))
            settled = c.execute("DELETE FROM settlements WHERE ts < ?", (cutoff,)).rowcount
            alerts = c.execute("DELETE FROM alerts WHERE ts < ?", (alerts_before,)).rowcount
            old = [(i,) for i, p in c.execute("SELECT id, period FROM totals WHERE (period LIKE 'R%' OR period "
                                              "LIKE 'E%') AND reserved = 0").fetchall()
                   if old_window_key(p, now, 2 * 86400)]
            c.executemany("DELETE FROM totals WHERE id=?", old)
            c.executemany("DELETE FROM instances WHERE period=?", [
                (p,) for (p,) in c.execute("SELECT DISTINCT period FROM instances WHERE period LIKE 'R%' OR period "
                                           "LIKE 'E%'").fetchall() if old_window_key(p, now, 2 * 86400)])
            return PruneResult(days, settled, alerts, len(old))

        result: PruneResult = self._write(tx)
        if result.buckets:
            self._located.clear()  # cached row ids of deleted buckets must not be reused
        return result

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
