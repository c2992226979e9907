"""The I/O around runaway detection (runaway.py): each finding is alerted once across every process (the store's
once-only claim), kept in the alert history, counted, and its penalty shared through the store so that every
worker and replica refuses the value's requests until the cool-down ends."""

from __future__ import annotations

import asyncio
import json
import logging
import time

from prometheus_client import Counter

from nexus_extproc.budget.alerts import AlertSender
from nexus_extproc.budget.book import Book
from nexus_extproc.budget.runaway import Detector, Finding
from nexus_extproc.budget.scopes import RequestFacts
from nexus_extproc.ledger import StoreUnavailable
from nexus_extproc.ops import metrics

log = logging.getLogger(__name__)

runaway_findings = Counter("nexus_runaway_findings_total",
                           "Runaway findings (a value spending factor x its baseline or its peers), once each",
                           ["dimension", "action"])
PENALTIES_META = "runaway:penalties"
MAX_SHARED = 1_000


class RunawayGuard:
    def __init__(self, book: Book, sender: AlertSender, detector: Detector) -> None:
        self.book = book
        self.sender = sender
        self.detector = detector
        self._tasks: set[asyncio.Task[None]] = set()

    def settled(self, facts: RequestFacts | None, micros: int) -> None:
        """After a settlement counted: cheap in-process check; alerting and sharing run in the background."""
        if facts is None:
            return
        for f in self.detector.observe(facts, micros, time.time()):
            task = asyncio.get_running_loop().create_task(self._report(f))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _report(self, f: Finding) -> None:
        ledger = self.book.ledger
        now = time.time()
        w_index = str(int(now) // f.window_s)
        try:
            if ledger is not None and not await ledger.first_seen(f"runaway:{f.dim}:{f.value}", w_index, now):
                return  # another process found it first and reported it
        except StoreUnavailable:
            metrics.store_failures.labels("alert_log").inc()
        runaway_findings.labels(f.dim, f.action).inc()
        log.warning("runaway spend", extra={k: v for k, v in f.doc().items() if k != "value"})
        payload: dict[str, object] = {"budget": "runaway", "threshold": "runaway", "period": w_index, **f.doc()}
        if ledger is not None:
            try:
                payload["id"] = await ledger.record_alert(now, f"runaway:{f.dim}", w_index, "runaway", f.window_micros,
                                                          max(f.baseline_micros, f.peers_micros))
                if f.action != "alert":
                    await self._share((f.dim, f.value), now + self.detector.cooldown_s)
            except StoreUnavailable:
                metrics.store_failures.labels("alert_log").inc()
        self.sender.send(payload)

    async def _share(self, key: tuple[str, str], until: float) -> None:
        """Read-merge-write of one small document: two processes finding at once may drop one penalty from
        the shared copy; each still enforces its own, and the next finding shares it again."""
        assert self.book.ledger is not None
        doc = self._read(await self.book.ledger.get_meta(PENALTIES_META))
        now = time.time()
        doc = {k: u for k, u in doc.items() if u > now}
        doc["\t".join(key)] = until
        if len(doc) > MAX_SHARED:
            doc = dict(sorted(doc.items(), key=lambda kv: -kv[1])[:MAX_SHARED])
        await self.book.ledger.set_meta(PENALTIES_META, json.dumps(doc))

    @staticmethod
    def _read(raw: str | None) -> dict[str, float]:
        try:
            doc = json.loads(raw or "{}")
        except ValueError:
            return {}
        return {str(k): float(v) for k, v in doc.items()} if isinstance(doc, dict) else {}

    async def load(self) -> None:
        """The penalties other processes found (every settings reload)."""
        if self.book.ledger is None or self.detector.config.action == "alert":
            return
        now = time.time()
        for k, until in self._read(await self.book.ledger.get_meta(PENALTIES_META)).items():
            dim, _, value = k.partition("\t")
            if until > now and until > self.detector.penalties.get((dim, value), 0.0):
                self.detector.penalties[(dim, value)] = until
