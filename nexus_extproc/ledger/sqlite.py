"""SQLite ledger: the embedded default, safe for several `--workers` processes on one machine.

WAL mode lets readers run beside the single writer; every mutation is one `BEGIN IMMEDIATE` transaction,
which takes the write lock up front, so the limit check and the reservation cannot interleave with another
process's. `synchronous=NORMAL` (default) makes a committed settle survive a crash of the process (kill -9);
an OS crash or power loss can lose the last transactions since the WAL was synced. `FULL` syncs every commit.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from nexus_extproc.ledger.base import (
    AlertRecord,
    AuditRecord,
    CalibrationSums,
    ForwardNote,
    Key,
    Ledger,
    PruneResult,
    ReapResult,
    ReserveResult,
    SpendAgg,
    SpendRecord,
    StoreUnavailable,
    Totals,
)
from nexus_extproc.ledger.one_thread import OneThread
from nexus_extproc.ledger.sqlite_schema import SCHEMA_VERSION, LedgerSchemaError
from nexus_extproc.ledger.sqlite_sync import SyncSqlite

__all__ = ["SCHEMA_VERSION", "LedgerSchemaError", "SqliteLedger"]

T = TypeVar("T")


class SqliteLedger(SyncSqlite, Ledger):
    """The async face of the SQLite ledger: each call goes to the ledger's one thread (sqlite_sync.py)."""

    def __init__(self, path: str, timeout_ms: int = 250, synchronous: str = "NORMAL",
                 wal_max_bytes: int = 64 << 20) -> None:
        super().__init__(path, timeout_ms, synchronous, wal_max_bytes)
        self._settles: list[tuple[str, Sequence[Key], int, SpendRecord, asyncio.Future[bool]]] = []
        self._settling = False
        self._drainer: asyncio.Task[None] | None = None

    # ---- the event loop's side: every call runs on the ledger's one thread -------------------------------

    async def _io(self, fn: Callable[..., T], *args: object) -> T:
        """sqlite3 blocks while another process holds the write lock (up to busy_timeout); on the event loop
        that would stall every stream, so each call runs on this ledger's single thread (one thread: the
        connection and the shape caches are never shared). A call that waited past the store timeout behind
        others fails at once instead of adding its own wait to the queue."""
        enqueued = time.monotonic()
        limit = self._timeout_ms / 1000

        def run() -> T:
            if time.monotonic() - enqueued > limit:
                raise StoreUnavailable("sqlite: queued past the store timeout")
            try:
                return fn(*args)
            except (sqlite3.DatabaseError, StoreUnavailable) as e:
                if "full" in str(e):  # SQLITE_FULL: give the WAL's space back so a later call can succeed
                    self._checkpoint_sync(True)
                if isinstance(e, StoreUnavailable):
                    raise
                raise StoreUnavailable(f"sqlite: {e}") from None

        return await self._thread.call(run)

    async def _report(self, fn: Callable[..., T], *args: object) -> T:
        """Report reads (spend, instances, alert and audit lists) run on their own connection and thread: WAL
        lets them read while the request path writes, so a report over months of settlements never queues a
        reserve behind it (the request path's calls would time out behind it and be refused)."""
        if self._path == ":memory:":
            return await self._io(fn, *args)
        if self._reader is None or self._reader_db is None:
            self._reader_db = sqlite3.connect(self._path, timeout=10, isolation_level=None, check_same_thread=False)
            self._reader_db.execute("PRAGMA query_only=1")
            self._reader = OneThread("nexus-sqlite-reports")
        db = self._reader_db

        def run() -> T:
            try:
                return fn(*args, db=db)
            except sqlite3.DatabaseError as e:
                raise StoreUnavailable(f"sqlite: {e}") from None

        return await self._reader.call(run)

    async def totals(self, budget: str, period: str) -> Totals:
        return await self._io(self._totals_sync, budget, period)

    async def buckets(self, budget: str, period: str) -> list[Totals]:
        return await self._io(self._buckets_sync, budget, period)

    async def reserve(self, req_id: str, keys: Sequence[Key], amount: int, expires_at: float,
                      caps: Sequence[int | None] | None = None,
                      forwarded: tuple[float, ForwardNote] | None = None, tokens: int = 0) -> ReserveResult:
        return await self._io(self._reserve_sync, req_id, keys, amount, expires_at, caps, forwarded, tokens)

    async def settle(self, req_id: str, keys: Sequence[Key], cost: int, record: SpendRecord) -> bool:
        """Group commit: settlements that arrive while one transaction runs (a batch of access-log reports,
        streams ending together) go to the store together in the next one; one alone goes at once."""
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._settles.append((req_id, keys, cost, record, fut))
        if not self._settling:
            self._settling = True
            task = asyncio.get_running_loop().create_task(self._drain_settles())
            self._drainer = task
        return await fut

    async def _drain_settles(self) -> None:
        try:
            while self._settles:
                batch, self._settles = self._settles, []
                try:
                    results = await self._io(self._settle_many_sync, [b[:4] for b in batch])
                except Exception as e:
                    for b in batch:
                        if not b[4].done():
                            b[4].set_exception(e)
                    continue
                for b, ok in zip(batch, results, strict=True):
                    if not b[4].done():
                        b[4].set_result(ok)
        finally:
            self._settling = False

    async def correct(self, req_id: str, keys: Sequence[Key], cost: int, record: SpendRecord) -> bool:
        return await self._io(self._correct_sync, req_id, keys, cost, record)

    async def release(self, req_id: str) -> int:
        return await self._io(self._release_sync, req_id)

    async def mark_forwarded(self, req_id: str, at: float, note: ForwardNote) -> None:
        await self._io(self._mark_forwarded_sync, req_id, at, note)

    async def reap(self, now: float) -> ReapResult:
        return await self._io(self._reap_sync, now)

    async def first_seen(self, budget: str, period: str, now: float) -> bool:
        return await self._io(self._first_seen_sync, budget, period, now)

    async def set_meta(self, key: str, value: str) -> None:
        await self._io(self._set_meta_sync, key, value)

    async def get_meta(self, key: str) -> str | None:
        return await self._io(self._get_meta_sync, key)

    async def settlement_count(self) -> int:
        return await self._io(self._settlement_count_sync)

    async def get_settings(self, budget: str) -> dict[str, object] | None:
        return await self._io(self._get_settings_sync, budget)

    async def put_settings(self, budget: str, settings: dict[str, object] | None,
                           audit: list[AuditRecord]) -> None:
        await self._io(self._put_settings_sync, budget, settings, audit)

    async def record_alert(self, ts: float, budget: str, period: str, threshold: str, spend_micros: int,
                           limit_micros: int) -> int:
        return await self._io(self._record_alert_sync, ts, budget, period, threshold, spend_micros, limit_micros)

    async def alert_delivered(self, alert_id: int, delivery: str, attempts: int) -> None:
        await self._io(self._alert_delivered_sync, alert_id, delivery, attempts)

    async def list_alerts(self, limit: int) -> list[AlertRecord]:
        return await self._report(self._list_alerts_sync, limit)

    async def ack_alert(self, alert_id: int, actor: str, at: float) -> AlertRecord | None:
        return await self._io(self._ack_alert_sync, alert_id, actor, at)

    async def claim_instance(self, parent: str, period: str, name: str, max_instances: int,
                             idle_ttl_s: int = 0) -> bool:
        return await self._io(self._claim_instance_sync, parent, period, name, max_instances, idle_ttl_s)

    async def instances(self, parent: str, period: str) -> list[tuple[str, Totals]]:
        return await self._report(self._instances_sync, parent, period)

    async def all_settings(self) -> dict[str, dict[str, object]]:
        return await self._io(self._all_settings_sync)

    async def append_audit(self, audit: list[AuditRecord]) -> None:
        await self._io(self._append_audit_sync, audit)

    async def audit_log(self, limit: int) -> list[AuditRecord]:
        return await self._report(self._audit_log_sync, limit)

    async def prune(self, settlements_before: float, alerts_before: float, now: float) -> PruneResult:
        return await self._io(self._prune_sync, settlements_before, alerts_before, now)

    async def spend(self, start_ts: float, end_ts: float, per_budget: bool = True) -> list[SpendAgg]:
        return await self._report(self._spend_sync, start_ts, end_ts, per_budget)

    async def merge_calibration(self, deltas: dict[str, CalibrationSums], now: float,
                                half_life_s: float) -> dict[str, CalibrationSums]:
        return await self._io(self._merge_calibration_sync, deltas, now, half_life_s)

    async def reset_calibration(self) -> int:
        return await self._io(self._reset_calibration_sync)

    async def checkpoint(self, force: bool = False) -> int:
        """Called by the reconciler each pass; returns the WAL size folded back (0: nothing to do)."""
        return await self._io(self._checkpoint_sync, force)

    async def close(self) -> None:
        if self._drainer is not None and not self._drainer.done():
            await asyncio.shield(self._drainer)  # settlements already handed over are written first
        if self._reader is not None and self._reader_db is not None:
            await self._reader.call(self._reader_db.close)
            self._reader.shutdown()
        await self._thread.call(self._close_sync)
        self._thread.shutdown()
