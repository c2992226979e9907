"""The FinOps read side for the admin edges: roll-ups, the FOCUS export, forecasts and recommendations, all
computed from the ledger's settlements. Separate from BudgetAdmin (which reads and changes budgets) so neither
facade grows into a hub."""

from __future__ import annotations

from nexus_extproc.budget.book import Book
from nexus_extproc.budget.focus import PriceInfo, focus_rows
from nexus_extproc.budget.reports import SpendRow, roll_up
from nexus_extproc.metering.pricing import PriceBook

_PROVIDER_NAMES = {"openai": ("OpenAI", "OpenAI API"), "anthropic": ("Anthropic", "Anthropic API")}


class Insights:
    def __init__(self, book: Book) -> None:
        self._book = book
        self._prices: PriceBook | None = None  # built on first export: the request path never pays for it

    @property
    def prices(self) -> PriceBook:
        if self._prices is None:
            self._prices = PriceBook(self._book.config)
        return self._prices

    async def spend(self, start_ts: float, end_ts: float, group_by: list[str],
                    per_budget: bool = True) -> list[SpendRow]:
        """Raises ValueError for an unknown grouping."""
        ledger = self._book.ledger
        return roll_up(await ledger.spend(start_ts, end_ts, per_budget), group_by) if ledger else []

    def price_info(self, backend: str, model: str) -> PriceInfo:
        b = self._book.config.backends.get(backend)
        if b is None:
            return PriceInfo("Unknown", backend or "unknown", {})
        if b.type == "local":
            return PriceInfo("Self-hosted", backend, self.prices.list_prices(b.prices_from, model))
        provider, service = _PROVIDER_NAMES.get(b.prices_from, (b.prices_from.title(), f"{b.prices_from} API"))
        return PriceInfo(provider, service, self.prices.list_prices(b.prices_from, model))

    async def focus(self, start_ts: float, end_ts: float) -> list[dict[str, str]]:
        ledger = self._book.ledger
        if ledger is None:
            return []
        return focus_rows(await ledger.spend(start_ts, end_ts, per_budget=False), self.price_info)
