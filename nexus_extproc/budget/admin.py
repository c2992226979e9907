"""The budget facade the admin edges use (HTTP, gRPC, the CLI's reports): read state, change settings, list
spend and audit. The request path has its own (service.py); neither edge reaches into the store."""

from __future__ import annotations

from datetime import datetime

from nexus_extproc.budget.alert_history import AlertHistory
from nexus_extproc.budget.book import Book, BudgetDef, BudgetState, Settings, differences
from nexus_extproc.budget.insights import Insights
from nexus_extproc.budget.policy import BudgetView
from nexus_extproc.budget.reports import SpendRow
from nexus_extproc.budget.runtime import RuntimeBudgets
from nexus_extproc.ledger import AuditRecord, Totals


class BudgetAdmin:
    def __init__(self, book: Book) -> None:
        self._book = book
        self.insights = Insights(book)  # reports, exports, forecasts, recommendations
        self.alerts = AlertHistory(book)
        self.runtime = RuntimeBudgets(book)  # CreateBudget, DeleteBudget

    @property
    def enabled(self) -> bool:
        return self._book.enabled

    @property
    def defs(self) -> list[BudgetDef]:
        return self._book.defs

    def find(self, name: str) -> BudgetDef | None:
        return self._book.by_name.get(name)

    def now(self) -> datetime:
        return self._book.clock()

    def last_view(self, d: BudgetDef) -> BudgetView:
        """From the totals this process read last (no store call): what the metrics scrape shows."""
        return self._book.view_of(d, self._book.last_totals.get(d.name, Totals(0, 0)))

    async def state(self, d: BudgetDef) -> BudgetState:
        return await self._book.state(d)

    async def load_settings(self) -> None:
        await self._book.load_settings()

    async def update_settings(self, name: str, new: Settings, actor: str) -> Settings:
        return await self._book.update_settings(name, new, actor)

    async def reset_settings(self, name: str, actor: str) -> Settings:
        return await self._book.reset_settings(name, actor)

    @staticmethod
    def provenance(d: BudgetDef) -> dict[str, object]:
        """Where the budget's limit and action come from, for /v1/stats and the admin API."""
        if d.set_by is None:
            return {"source": "config"}
        return {"source": "runtime", "set_by": d.set_by, "set_at": d.set_at,
                "differs_from_config": differences(d)}

    async def spend(self, start_ts: float, end_ts: float, group_by: list[str]) -> list[SpendRow]:
        """Raises ValueError for an unknown grouping."""
        return await self.insights.spend(start_ts, end_ts, group_by)

    async def audit(self, limit: int) -> list[AuditRecord]:
        ledger = self._book.ledger
        return await ledger.audit_log(limit) if ledger else []

    async def last_reconciliation(self) -> str | None:
        ledger = self._book.ledger
        return await ledger.get_meta("last_reconciliation") if ledger else None
