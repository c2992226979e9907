"""Durable spend ledger: atomic reserve → settle/release, shared by every worker and replica."""

from nexus_extproc.ledger.base import (
    AlertLog,
    AlertRecord,
    AuditRecord,
    CalibrationStore,
    ControlStore,
    ForwardNote,
    Key,
    Ledger,
    PruneResult,
    ReapResult,
    SpendAgg,
    SpendLedger,
    SpendLog,
    SpendRecord,
    StoreOpenError,
    StoreUnavailable,
    Totals,
)

__all__ = [
    "AlertLog", "AlertRecord",
    "AuditRecord", "CalibrationStore", "ControlStore", "ForwardNote", "Key", "Ledger", "PruneResult", "ReapResult",
    "SpendAgg",
    "SpendLedger", "SpendLog", "SpendRecord", "StoreOpenError", "StoreUnavailable", "Totals", "open_ledger",
]


def open_ledger(kind: str, **kwargs: object) -> Ledger:
    if kind == "sqlite":
        from nexus_extproc.ledger.sqlite import SqliteLedger

        return SqliteLedger(**kwargs)  # type: ignore[arg-type]
    if kind == "redis":
        from nexus_extproc.ledger.redis import RedisLedger

        return RedisLedger(**kwargs)  # type: ignore[arg-type]
    raise ValueError(f"unknown store kind {kind!r}")
