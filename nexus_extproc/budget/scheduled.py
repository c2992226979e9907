"""Scheduled reports: each budget with `reports:` gets one report per window (yesterday, last week, last month),
made at its scheduled local time by whichever replica claims the window first in the store, like alerts. A
replica that was down at the scheduled time makes it when it comes back (the claim is per window, not per
instant). Delivery goes to a directory or a webhook; the edge supplies the HTTP (`post`)."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from nexus_extproc.budget.alert_mail import Mail
from nexus_extproc.budget.alerts import Post
from nexus_extproc.budget.book import Book, BudgetDef
from nexus_extproc.budget.focus import PriceOf, focus_rows, to_focus_csv
from nexus_extproc.budget.reports import roll_up, row_dict, to_csv
from nexus_extproc.config import ReportScheduleConfig
from nexus_extproc.ledger import StoreUnavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Window:
    key: str  # "2026-12-05", "2026-W49", "2026-11"
    start: datetime
    end: datetime


def due_window(cfg: ReportScheduleConfig, now: datetime) -> Window | None:
    """The window whose report is due at `now`: the last complete one, once the schedule time has passed on
    the window's first day after it. None before that."""
    tz = ZoneInfo(cfg.timezone)
    local = now.astimezone(tz)
    hh, mm = (int(x) for x in cfg.schedule.split(":"))
    today = datetime(local.year, local.month, local.day, tzinfo=tz)
    if cfg.every == "daily":
        end = today
        start = end - timedelta(days=1)
        key = start.strftime("%Y-%m-%d")
    elif cfg.every == "weekly":
        end = today - timedelta(days=today.weekday())
        start = end - timedelta(days=7)
        iso = start.isocalendar()
        key = f"{iso.year:04d}-W{iso.week:02d}"
    else:
        end = datetime(local.year, local.month, 1, tzinfo=tz)
        prev = end - timedelta(days=1)
        start = datetime(prev.year, prev.month, 1, tzinfo=tz)
        key = start.strftime("%Y-%m")
    if local < end.replace(hour=hh, minute=mm):
        return None
    return Window(key, start, end)


class ReportScheduler:
    def __init__(self, book: Book, price_of: Callable[[], PriceOf], post: Post | None = None,
                 mail: Mail | None = None) -> None:
        self.book = book
        self.price_of = price_of
        self.post = post
        self.mail = mail  # alerts.email's SMTP, for `mailto:` targets
        self._done: set[tuple[str, str]] = set()

    async def run_due(self) -> list[str]:
        """Make every report that is due and not yet made by anyone; returns where each went."""
        out = []
        now = self.book.clock()
        for d in list(self.book.defs):
            cfg = d.reports
            if cfg is None:
                continue
            w = due_window(cfg, now)
            if w is None or (d.name, w.key) in self._done or self.book.ledger is None:
                continue
            try:
                mine = await self.book.ledger.first_seen(f"report:{d.name}", w.key, time.time())
            except StoreUnavailable:
                continue  # the next pass tries again
            self._done.add((d.name, w.key))
            if mine:
                out.append(await self._make(d, cfg, w))
        return out

    async def _make(self, d: BudgetDef, cfg: ReportScheduleConfig, w: Window) -> str:
        assert self.book.ledger is not None
        lo, hi = w.start.timestamp(), w.end.timestamp()
        if cfg.format == "focus":
            # Each settlement once, like every FOCUS export; the budget's own spend is in the json/csv forms.
            body = to_focus_csv(focus_rows(await self.book.ledger.spend(lo, hi, per_budget=False), self.price_of()))
            ext = "csv"
        else:
            rows = [r for r in roll_up(await self.book.ledger.spend(lo, hi), ["budget", "day", "model"])
                    if r.budget == d.name or r.budget.startswith(d.name + "/")]
            if cfg.format == "csv":
                body, ext = to_csv(rows), "csv"
            else:
                body = json.dumps({"budget": d.name, "window": w.key, "from": w.start.isoformat(),
                                   "to": w.end.isoformat(), "cost_usd": sum(r.cost_micros for r in rows) / 1e6,
                                   "rows": [row_dict(r) for r in rows]}, indent=2)
                ext = "json"
        target = cfg.to
        if target.startswith("mailto:"):
            to = [a.strip() for a in target[len("mailto:"):].split(",") if a.strip()]
            if self.mail is None or not to:
                log.error("a scheduled report to mail, without alerts.email configured", extra={"budget": d.name})
                return "no-mail"
            await self.mail(to, f"[nexus] {d.name} report {w.key} ({cfg.format})", body)
            log.info("scheduled report mailed", extra={"budget": d.name, "window": w.key, "recipients": len(to)})
            return f"mailto ({len(to)})"
        if target.startswith(("http://", "https://")):
            if self.post is None:
                return "no-http"
            status, _ = await self.post(target, {"budget": d.name, "window": w.key, "format": cfg.format,
                                                 "content": body}, 10.0)
            log.info("scheduled report sent", extra={"budget": d.name, "window": w.key, "status": status})
            return f"{target} ({status})"
        path = Path(target) / f"{d.name}-{w.key}.{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
            f.write(body)
        os.replace(f.name, path)  # whole or not at all, for whoever picks the file up
        log.info("scheduled report written", extra={"budget": d.name, "window": w.key, "path": str(path)})
        return str(path)
