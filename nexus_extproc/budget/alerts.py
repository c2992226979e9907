"""Budget alerts: each threshold fires once per budget and period, across every worker and replica.

Crossing is noticed on the request path from the totals the reservation returned (no extra read); the claim
("first to see threshold T of budget B in period P") is an atomic store write, so exactly one process sends
it. Delivery runs in the background with retries and backoff: a slow or dead webhook never delays a request,
and a delivery that gives up is logged and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from decimal import Decimal
from typing import Any

from prometheus_client import Counter

from nexus_extproc.budget.alert_mail import MailSender
from nexus_extproc.budget.book import Book, BudgetDef
from nexus_extproc.budget.forecast import forecast
from nexus_extproc.budget.periods import Period
from nexus_extproc.config import AlertsConfig
from nexus_extproc.ledger import StoreUnavailable, Totals

log = logging.getLogger(__name__)

alerts_total = Counter("nexus_budget_alerts_total", "Budget alerts fired (once per budget, period, threshold)",
                       ["budget", "threshold"])
deliveries = Counter("nexus_alert_deliveries_total", "Webhook deliveries by result", ["result"])


# (url, payload, timeout_s) -> (HTTP status, Retry-After in seconds or None); raises OSError (ConnectionError)
# when nothing answered.
Post = Callable[[str, dict[str, Any], float], Awaitable[tuple[int, float | None]]]
# (alert id, delivery result, attempts): where the outcome is recorded (the store's alert log)
OnResult = Callable[[int, str, int], Coroutine[Any, Any, None]]
MAX_RETRY_AFTER_S = 300.0


def retryable(status: int) -> bool:
    """5xx and 429 may pass; any other 4xx will not, however often it is sent (a bad URL, a refused token)."""
    return status >= 500 or status == 429


class AlertSender:
    """Queue, retries and counting of webhook deliveries; the HTTP itself is `post` (edge/webhook.py).

    Retries back off exponentially from `backoff_secs` with jitter (0.5-1.5x, so replicas that failed together
    do not retry together), wait what a 429 or 503 asks in Retry-After (up to 5 min), and stop at once on a
    4xx other than 429."""

    def __init__(self, config: AlertsConfig, post: Post | None = None, rng: random.Random | None = None) -> None:
        self.config = config
        self.post = post
        self.on_result: OnResult | None = None
        self._rng = rng or random.Random()
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=10_000)
        self._task: asyncio.Task[None] | None = None
        self._results: set[asyncio.Task[None]] = set()
        self.sleep: Callable[[float], Awaitable[None]] = asyncio.sleep  # tests record the waits
        self.mail: MailSender | None = None  # alert mail beside the webhook (alert_mail.py), when configured

    def send(self, payload: dict[str, Any]) -> None:
        # The label is the definition (bounded), never a distinct-value instance.
        alerts_total.labels(payload.get("definition") or payload["budget"], str(payload["threshold"])).inc()
        log.warning("budget alert", extra={k: payload[k] for k in ("budget", "period", "threshold")})
        if self.mail is not None:
            self.mail.send(payload)
        if not self.config.webhook_url or self.post is None:
            self._result(payload, "no_webhook", 0)
            return
        try:
            self._queue.put_nowait(payload)
        except asyncio.QueueFull:
            deliveries.labels("dropped").inc()
            self._result(payload, "dropped", 0)
            return
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    def _result(self, payload: dict[str, Any], result: str, attempts: int) -> None:
        if self.on_result is None or payload.get("id") is None:
            return
        task = asyncio.get_running_loop().create_task(self.on_result(int(payload["id"]), result, attempts))
        self._results.add(task)
        task.add_done_callback(self._results.discard)

    async def _run(self) -> None:
        while not self._queue.empty():
            await self._deliver(self._queue.get_nowait())

    async def _deliver(self, payload: dict[str, Any]) -> None:
        assert self.post is not None
        delay = self.config.backoff_secs
        attempt = 0
        for attempt in range(1, self.config.max_attempts + 1):
            retry_after: float | None = None
            try:
                status, retry_after = await self.post(self.config.webhook_url or "", payload,
                                                      self.config.timeout_secs)
                if status < 300:
                    deliveries.labels("delivered").inc()
                    self._result(payload, "delivered", attempt)
                    return
                if not retryable(status):
                    break
            except (TimeoutError, OSError):
                pass
            if attempt < self.config.max_attempts:
                deliveries.labels("retried").inc()
                wait = delay * (0.5 + self._rng.random())
                if retry_after is not None:
                    wait = max(wait, min(retry_after, MAX_RETRY_AFTER_S))
                await self.sleep(wait)
                delay *= 2
        deliveries.labels("failed").inc()
        self._result(payload, "failed", attempt)
        log.error("budget alert not delivered", extra={"budget": payload["budget"],
                                                       "threshold": payload["threshold"],
                                                       "attempts": attempt})

    async def drain(self, grace: float) -> None:
        if self.mail is not None:
            await self.mail.drain(grace)
        if self._task is not None and not self._task.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._task), grace)
        if self._results:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*self._results, return_exceptions=True), grace)


def alert_payload(budget: str, period: str, threshold: Decimal | str, spend: int, reserved: int, limit: int,
                  projected: int | None) -> dict[str, Any]:
    return {"budget": budget, "period": period, "threshold": str(threshold),
            "spend_usd": spend / 1e6, "reserved_usd": reserved / 1e6, "limit_usd": limit / 1e6,
            "forecast_usd": None if projected is None else projected / 1e6, "ts": int(time.time())}


class AlertWatch:
    """Notices threshold crossings and forecast overruns on the request path; the claim and the send run in
    the background."""

    def __init__(self, book: Book, sender: AlertSender) -> None:
        self.book = book
        self.sender = sender
        self._fired: set[tuple[str, str, str]] = set()
        self._forecast_checked: dict[str, float] = {}

    def check(self, matched: list[BudgetDef], periods: list[Period], after: list[Totals]) -> None:
        """Cheap in-process check on the request path (integer compares; the forecast at most every 10 s per
        budget); the once-only claim and the webhook run in the background."""
        now = self.book.clock().timestamp()
        if len(self._fired) > 100_000:  # distinct-value instances × thresholds × periods: only a local dedupe,
            self._fired.clear()  # the store's claim is what makes an alert fire once
            self._forecast_checked.clear()
        for d, p, t in zip(matched, periods, after, strict=True):
            limit = d.settings.limit_at(now)
            used_bp = (t.settled + t.reserved) * 10_000 // max(limit, 1)
            if used_bp < d.thresholds_bp[0] if d.thresholds_bp else True:
                if now - self._forecast_checked.get(d.name, 0.0) < 10.0:
                    continue
            crossed = False
            for th, th_bp in zip(d.thresholds, d.thresholds_bp, strict=True):
                if used_bp >= th_bp and (d.name, p.alert_key, str(th)) not in self._fired:
                    self._fired.add((d.name, p.alert_key, str(th)))
                    crossed = True
                    asyncio.get_running_loop().create_task(self._claim_and_send(d, p, str(th), t, limit))
            key = (d.name, p.alert_key, "forecast")
            if key in self._fired or (not crossed and now - self._forecast_checked.get(d.name, 0.0) < 10.0):
                continue
            self._forecast_checked[d.name] = now
            # A window's forecast means nothing, and a token budget's history is in dollars.
            if now - p.start.timestamp() >= 86400 and not d.rule.short and d.unit != "tokens":
                # Reserved spend counts as committed: the check runs at threshold crossings, when the requests
                # that crossed are often still in flight.
                fc = forecast(t.settled + t.reserved, limit, p.start.timestamp(), p.end.timestamp(), now)
                if fc.exceeds(limit):
                    self._fired.add(key)
                    asyncio.get_running_loop().create_task(self._claim_and_send(d, p, "forecast", t, limit,
                                                                                fc.projected_micros))

    def forecast_overrun(self, d: BudgetDef, p: Period, t: Totals, limit: int, projected: int) -> None:
        """From the reconciler's series forecast: the end-of-period projection passes the limit. Same once-only
        claim as the request path's check, so whichever sees it first sends the one alert."""
        key = (d.name, p.alert_key, "forecast")
        if key in self._fired:
            return
        self._fired.add(key)
        asyncio.get_running_loop().create_task(self._claim_and_send(d, p, "forecast", t, limit, projected))

    async def _claim_and_send(self, d: BudgetDef, p: Period, threshold: str, t: Totals, limit: int,
                              projected: int | None = None) -> None:
        assert self.book.ledger is not None
        try:
            if not await self.book.ledger.first_seen(f"alert:{d.name}:{threshold}", p.alert_key, time.time()):
                return  # another worker or replica sent it
        except StoreUnavailable:
            self._fired.discard((d.name, p.alert_key, threshold))  # try again on a later request
            return
        if projected is None:
            projected = forecast(t.settled, limit, p.start.timestamp(), p.end.timestamp(),
                                 self.book.clock().timestamp()).projected_micros
        payload = alert_payload(d.name, p.alert_key, threshold, t.settled, t.reserved, limit, projected)
        payload["definition"] = d.label
        if d.unit == "tokens":  # its figures are tokens: said as such, never as dollars
            payload.update({"unit": "tokens", "spend_usd": None, "reserved_usd": None, "limit_usd": None,
                            "forecast_usd": None, "spend_tokens": t.settled, "reserved_tokens": t.reserved,
                            "limit_tokens": limit})
        try:
            payload["id"] = await self.book.ledger.record_alert(time.time(), d.name, p.alert_key, threshold, t.settled,
                                                                limit)
        except StoreUnavailable:
            payload["id"] = None  # claimed but not in the history: still sent
        self.sender.send(payload)
