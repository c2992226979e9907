"""Budgets created and deleted at runtime (CreateBudget, DeleteBudget): persisted in the store as settings
documents that carry a definition, so every replica adds or drops them at its next settings reload (book.py);
audited like every runtime change."""

from __future__ import annotations

import logging
import time

from nexus_extproc.budget.book import Book, BudgetDef, definition_doc
from nexus_extproc.config import BudgetDefConfig
from nexus_extproc.ledger import AuditRecord

log = logging.getLogger(__name__)

MAX_RUNTIME_BUDGETS = 1_000


class RuntimeBudgets:
    def __init__(self, book: Book) -> None:
        self._book = book

    @property
    def available(self) -> bool:
        """A store is open (a budget in the config, or an admin token: app.open_store)."""
        return self._book.ledger is not None

    async def create(self, c: BudgetDefConfig, actor: str) -> BudgetDef:
        """Persist a new budget; every replica adds it at its next settings reload. ValueError: name taken."""
        assert self._book.ledger is not None
        await self._book.load_settings()
        if c.name in self._book.by_name:
            raise ValueError("a budget with this name exists")
        if sum(d.origin == "runtime" for d in self._book.defs) >= MAX_RUNTIME_BUDGETS:
            raise ValueError(f"at most {MAX_RUNTIME_BUDGETS} budgets can be created at runtime")
        d = BudgetDef.from_config(c)
        d.origin, d.created_by, d.created_at = "runtime", actor, time.time()
        doc = {"definition": definition_doc(d), "created_by": actor, "created_at": d.created_at}
        await self._book.ledger.put_settings(c.name, doc, [AuditRecord(time.time(), actor, c.name, "budget", "",
                                                                 "created")])
        self._book.defs.append(d)
        self._book.by_name[d.name] = d
        self._book.settings_gen += 1
        log.info("budget created at runtime", extra={"budget": d.name, "actor": actor})
        return d

    async def delete(self, name: str, actor: str) -> None:
        """Only budgets created at runtime; their spend history stays in the ledger. ValueError otherwise."""
        assert self._book.ledger is not None
        await self._book.load_settings()
        d = self._book.by_name.get(name)
        if d is None:
            raise KeyError(name)
        if d.origin != "runtime":
            raise ValueError("budgets from the config file cannot be deleted at runtime (set them inactive)")
        await self._book.ledger.put_settings(name, None, [AuditRecord(time.time(), actor, name, "budget", "created",
                                                                "deleted")])
        self._book.defs.remove(d)
        del self._book.by_name[name]
        self._book.instances.pop(name, None)
        self._book.settings_gen += 1
        log.info("budget deleted at runtime", extra={"budget": name, "actor": actor})

