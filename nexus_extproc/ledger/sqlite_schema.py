"""The SQLite ledger's schema, its version, and the in-place upgrades from earlier versions."""

from __future__ import annotations

import sqlite3

SCHEMA = """
-- `id` is a stable row id (rows are never deleted; VACUUM keeps an INTEGER PRIMARY KEY): the hot path reads and
-- updates a request's budgets by id, each a direct b-tree seek, with no IN list (SQLite builds an ephemeral
-- table for one on every execution) and no RETURNING (it materialises the returned rows first).
CREATE TABLE IF NOT EXISTS totals (
  id INTEGER PRIMARY KEY, budget TEXT NOT NULL, period TEXT NOT NULL,
  settled INTEGER NOT NULL DEFAULT 0, reserved INTEGER NOT NULL DEFAULT 0,
  UNIQUE (budget, period));
-- One row per request: the same `amount` held in each budget of `budgets`, "budget period" lines (one statement
-- per request, not one per budget; budget names and period keys never contain whitespace).
-- `forwarded_at`: when the request was sent upstream (the provider bills it from then on); `note` is what a
-- reaped settlement records ("model\tbackend\tmodel_requested\tinput_tokens").
CREATE TABLE IF NOT EXISTS reservations (
  req_id TEXT PRIMARY KEY, amount INTEGER NOT NULL, budgets TEXT NOT NULL, expires_at REAL NOT NULL,
  forwarded_at REAL, note TEXT, tokens INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS reservations_expiry ON reservations (expires_at);
CREATE TABLE IF NOT EXISTS settlements (
  req_id TEXT PRIMARY KEY, ts REAL NOT NULL, model TEXT NOT NULL, backend TEXT NOT NULL,
  input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL,
  cost INTEGER NOT NULL, estimate INTEGER NOT NULL, source TEXT NOT NULL,
  budgets TEXT NOT NULL DEFAULT '[]',  -- JSON array of the budgets it counted against
  avoided INTEGER NOT NULL DEFAULT 0,
  model_requested TEXT NOT NULL DEFAULT '',
  task TEXT NOT NULL DEFAULT '', tags TEXT NOT NULL DEFAULT '', team TEXT NOT NULL DEFAULT '',
  cache_read_tokens INTEGER NOT NULL DEFAULT 0, output_reserved INTEGER NOT NULL DEFAULT 0,
  streamed INTEGER NOT NULL DEFAULT 0, agent TEXT NOT NULL DEFAULT '',
  tool TEXT NOT NULL DEFAULT '', session TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS calibration (
  key TEXT PRIMARY KEY, provider REAL NOT NULL, ours REAL NOT NULL, tool_calls REAL NOT NULL, n REAL NOT NULL,
  updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS periods (
  budget TEXT NOT NULL, period TEXT NOT NULL, first_seen REAL NOT NULL, PRIMARY KEY (budget, period));
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS settings (budget TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS audit (
  id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, actor TEXT NOT NULL, budget TEXT NOT NULL,
  field TEXT NOT NULL, old TEXT NOT NULL, new TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS settlements_ts ON settlements (ts);
CREATE TABLE IF NOT EXISTS alerts (
  id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, budget TEXT NOT NULL, period TEXT NOT NULL,
  threshold TEXT NOT NULL, spend INTEGER NOT NULL, lim INTEGER NOT NULL, delivery TEXT NOT NULL DEFAULT 'pending',
  attempts INTEGER NOT NULL DEFAULT 0, acked_by TEXT, acked_at REAL);
CREATE TABLE IF NOT EXISTS instances (
  parent TEXT NOT NULL, period TEXT NOT NULL, name TEXT NOT NULL, last_seen REAL NOT NULL DEFAULT 0,
  PRIMARY KEY (parent, period, name));
-- Retention: whole UTC days of settlements, aggregated at the reports' grain before they are deleted (per_budget
-- 1: one row set per budget, as spend(per_budget=True) returns; 0: each settlement once).
CREATE TABLE IF NOT EXISTS rollup (
  per_budget INTEGER NOT NULL, budget TEXT NOT NULL, model TEXT NOT NULL, day TEXT NOT NULL, requests INTEGER NOT NULL,
  input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL, cost INTEGER NOT NULL, estimate INTEGER NOT NULL,
  avoided INTEGER NOT NULL, model_requested TEXT NOT NULL, reaped INTEGER NOT NULL, backend TEXT NOT NULL,
  task TEXT NOT NULL, tags TEXT NOT NULL, cache_read_tokens INTEGER NOT NULL, output_reserved INTEGER NOT NULL,
  streamed INTEGER NOT NULL, team TEXT NOT NULL, agent TEXT NOT NULL, tool TEXT NOT NULL, session TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS rollup_day ON rollup (day);
"""


SCHEMA_VERSION = 12

# Version 1 had no `id` in totals and one "budget period amount" line per budget in reservations. Upgraded in
# place: totals keep their rows and sums; v1 reservations (left by a server that has stopped, so never settled)
# are released first, as the reaper would have done at their expiry.
MIGRATE_1_TO_2 = """
ALTER TABLE totals RENAME TO totals_v1;
CREATE TABLE totals (
  id INTEGER PRIMARY KEY, budget TEXT NOT NULL, period TEXT NOT NULL,
  settled INTEGER NOT NULL DEFAULT 0, reserved INTEGER NOT NULL DEFAULT 0,
  UNIQUE (budget, period));
INSERT INTO totals (budget, period, settled, reserved) SELECT budget, period, settled, reserved FROM totals_v1;
DROP TABLE totals_v1;
DROP TABLE reservations;
CREATE TABLE reservations (
  req_id TEXT PRIMARY KEY, amount INTEGER NOT NULL, budgets TEXT NOT NULL, expires_at REAL NOT NULL);
CREATE INDEX reservations_expiry ON reservations (expires_at);
"""


# Version 2 had neither the asked-for model on settlements nor the shared estimate calibration.
MIGRATE_2_TO_3 = """
ALTER TABLE settlements ADD COLUMN model_requested TEXT NOT NULL DEFAULT '';
CREATE TABLE calibration (
  key TEXT PRIMARY KEY, provider REAL NOT NULL, ours REAL NOT NULL, tool_calls REAL NOT NULL, n REAL NOT NULL,
  updated REAL NOT NULL);
"""


# Version 3 did not know whether a reservation's request had been forwarded, so its reaper released them all.
MIGRATE_3_TO_4 = """
ALTER TABLE reservations ADD COLUMN forwarded_at REAL;
ALTER TABLE reservations ADD COLUMN note TEXT;
"""


# Version 4 had no task, tag or team attribution, cache reads, reserved output or stream flag on settlements.
MIGRATE_4_TO_5 = """
ALTER TABLE settlements ADD COLUMN task TEXT NOT NULL DEFAULT '';
ALTER TABLE settlements ADD COLUMN tags TEXT NOT NULL DEFAULT '';
ALTER TABLE settlements ADD COLUMN team TEXT NOT NULL DEFAULT '';
ALTER TABLE settlements ADD COLUMN cache_read_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE settlements ADD COLUMN output_reserved INTEGER NOT NULL DEFAULT 0;
ALTER TABLE settlements ADD COLUMN streamed INTEGER NOT NULL DEFAULT 0;
"""


# Version 5 kept no alert history.
MIGRATE_5_TO_6 = """
CREATE TABLE alerts (
  id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, budget TEXT NOT NULL, period TEXT NOT NULL,
  threshold TEXT NOT NULL, spend INTEGER NOT NULL, lim INTEGER NOT NULL, delivery TEXT NOT NULL DEFAULT 'pending',
  attempts INTEGER NOT NULL DEFAULT 0, acked_by TEXT, acked_at REAL);
"""


# Version 6 had no budgets per distinct value.
MIGRATE_6_TO_7 = """
CREATE TABLE instances (
  parent TEXT NOT NULL, period TEXT NOT NULL, name TEXT NOT NULL, PRIMARY KEY (parent, period, name));
"""


# Version 7 did not record the agent on settlements.
MIGRATE_7_TO_8 = """
ALTER TABLE settlements ADD COLUMN agent TEXT NOT NULL DEFAULT '';
"""


# Version 8 did not record the client tool or session on settlements.
MIGRATE_8_TO_9 = """
ALTER TABLE settlements ADD COLUMN tool TEXT NOT NULL DEFAULT '';
ALTER TABLE settlements ADD COLUMN session TEXT NOT NULL DEFAULT '';
"""


# Version 9 had no idle expiry of distinct-value instances (session budgets).
MIGRATE_9_TO_10 = """
ALTER TABLE instances ADD COLUMN last_seen REAL NOT NULL DEFAULT 0;
"""

# Version 10 kept every settlement row forever (no retention roll-up).
MIGRATE_10_TO_11 = SCHEMA[SCHEMA.index("-- Retention"):]

# Version 11 had no token budgets: a reservation held one amount in every budget.
MIGRATE_11_TO_12 = """
ALTER TABLE reservations ADD COLUMN tokens INTEGER NOT NULL DEFAULT 0;
"""


def _release_v1_reservations(c: sqlite3.Cursor) -> None:
    for (items,) in c.execute("SELECT items FROM reservations").fetchall():
        for line in items.split("\n"):
            b, p, amt = line.split(" ")
            c.execute("UPDATE totals SET reserved = reserved - ? WHERE budget=? AND period=?", (int(amt), b, p))


def _run_script(c: sqlite3.Cursor, script: str) -> None:
    """Statement by statement inside the caller's transaction (executescript would commit it)."""
    sql = "\n".join(ln.split("--", 1)[0] for ln in script.splitlines())  # comments may hold ';'
    for stmt in sql.split(";"):
        if stmt.strip():
            c.execute(stmt)


class LedgerSchemaError(RuntimeError):
    pass
