"""Alert history for the admin edges: every alert fired, its delivery outcome, and acknowledgements (audited)."""

from __future__ import annotations

import time

from nexus_extproc.budget.book import Book
from nexus_extproc.ledger import AlertRecord, AuditRecord


class AlertHistory:
    def __init__(self, book: Book) -> None:
        self._book = book

    async def list(self, limit: int = 100) -> list[AlertRecord]:
        ledger = self._book.ledger
        return await ledger.list_alerts(max(1, min(limit, 1000))) if ledger else []

    async def ack(self, alert_id: int, actor: str) -> AlertRecord | None:
        """The first acknowledgement stands; each is audited under the alert's budget."""
        ledger = self._book.ledger
        if ledger is None:
            return None
        rec = await ledger.ack_alert(alert_id, actor, time.time())
        if rec is not None and rec.acked_by == actor:
            await ledger.append_audit([AuditRecord(time.time(), actor, rec.budget, "alert_ack", "",
                                                f"{rec.id} ({rec.threshold}, {rec.period})")])
        return rec
