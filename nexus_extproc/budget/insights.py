"""The FinOps read side for the admin edges: roll-ups, the FOCUS export, forecasts and recommendations, all
computed from the ledger's settlements. Separate from BudgetAdmin (which reads and changes budgets) so neither
facade grows into a hub."""

from __future__ import annotations

import time

from nexus_extproc.budget.book import Book, BudgetDef
from nexus_extproc.budget.focus import PriceInfo, focus_rows
from nexus_extproc.budget.projection import BudgetProjection, project
from nexus_extproc.budget.recommendations import Recommendation, recommend
from nexus_extproc.budget.reports import SpendRow, roll_up
from nexus_extproc.budget.scopes import overflow_name
from nexus_extproc.ledger import Totals
from nexus_extproc.metering.pricing import PriceBook

_PROVIDER_NAMES = {"openai": ("OpenAI", "OpenAI API"), "anthropic": ("Anthropic", "Anthropic API")}


class Insights:
    def __init__(self, book: Book) -> None:
        self._book = book
        self._prices: PriceBook | None = None  # built on first export: the request path never pays for it
        self._projections: dict[str, tuple[float, BudgetProjection]] = {}

    @property
    def prices(self) -> PriceBook:
        if self._prices is None:
            self._prices = PriceBook(self._book.config)
        return self._prices

    async def spend(self, start_ts: float, end_ts: float, group_by: list[str]) -> list[SpendRow]:
        """Grouped by budget, a settlement counts once in each budget it fell under; otherwise once in all
        (so a report by model or team sums to what was spent, however many budgets overlap). Raises ValueError
        for an unknown grouping."""
        ledger = self._book.ledger
        if ledger is None:
            return []
        return roll_up(await ledger.spend(start_ts, end_ts, "budget" in group_by), group_by)

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

    async def forecast(self, d: BudgetDef, name: str | None = None, max_age_s: float = 30.0) -> BudgetProjection:
        """Cached for `max_age_s`: it reads up to 56 days of settlements, and /v1/stats may be polled."""
        key = name or d.name
        hit = self._projections.get(key)
        if hit is not None and time.monotonic() - hit[0] < max_age_s:
            return hit[1]
        p = await project(self._book, d, key)
        if len(self._projections) > 10_000:
            self._projections.clear()
        self._projections[key] = (time.monotonic(), p)
        return p

    def _list_prices(self, backend: str, model: str) -> dict[str, int]:
        return self.price_info(backend, model).per_mtok_micros

    async def recommendations(self, start_ts: float, end_ts: float) -> list[Recommendation]:
        ledger = self._book.ledger
        if ledger is None:
            return []
        cfg = self._book.config
        cloud = {name for name, b in cfg.backends.items() if b.type == "cloud"}
        return recommend(await ledger.spend(start_ts, end_ts, per_budget=False), cfg.equivalents, cloud,
                         self._list_prices)

    def instance_summary(self, d: BudgetDef) -> tuple[int, int, int]:
        """(instances, settled micro-dollars over all, instances at their limit), as the reconciler last read."""
        return self._book.instance_summary.get(d.name, (0, 0, 0))

    async def overflow(self, d: BudgetDef) -> Totals:
        """What the values past max_instances spent together this period."""
        ledger = self._book.ledger
        if ledger is None or not d.distinct:
            return Totals(0, 0)
        return await ledger.totals(overflow_name(d.name), d.key(d.period(self._book.clock())))

    async def instances(self, d: BudgetDef) -> list[tuple[str, Totals]]:
        """A distinct-value definition's instances this period, with their totals (empty for other budgets)."""
        ledger = self._book.ledger
        if ledger is None or not d.distinct:
            return []
        return await ledger.instances(d.name, d.key(d.period(self._book.clock())))
