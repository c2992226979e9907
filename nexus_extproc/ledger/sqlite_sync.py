"""The SQLite ledger's work, synchronous: every call runs on the ledger's one thread (see sqlite.py). Split by
job: sqlite_core.py (the connection, transactions, shapes), sqlite_spend.py (the request path),
sqlite_control.py (settings, alerts, reports, calibration)."""

from __future__ import annotations

from nexus_extproc.ledger.sqlite_control import ControlSync
from nexus_extproc.ledger.sqlite_spend import SpendSync


class SyncSqlite(SpendSync, ControlSync):
    pass
