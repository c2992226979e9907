"""Alert mail beside the webhook (seed 004): each alert to the configured recipients and its budget's own,
in the background, with the webhook's retries (exponential backoff with jitter; a refusal that will not change,
a bad recipient or login, stops at once). The SMTP itself is injected (edge/email.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import Counter

from nexus_extproc.config import AlertsConfig

log = logging.getLogger(__name__)

mail_deliveries = Counter("nexus_alert_email_deliveries_total", "Alert mails by result", ["result"])

# (recipients, subject, body); raises ValueError when retrying cannot help, OSError when it may.
Mail = Callable[[list[str], str, str], Awaitable[None]]


def render(payload: dict[str, Any]) -> tuple[str, str]:
    """Subject and plain-text body: the payload's figures, one per line, in a stable order."""
    if payload.get("threshold") == "runaway":
        subject = f"[nexus] runaway spend: {payload.get('dimension')} ({payload.get('action')})"
    elif payload.get("threshold") == "forecast":
        subject = f"[nexus] budget {payload['budget']}: forecast passes the limit"
    else:
        subject = f"[nexus] budget {payload['budget']} at {payload['threshold']} %"
    body = "\n".join(f"{k}: {v}" for k, v in sorted(payload.items()))
    return subject, body + "\n"


class MailSender:
    def __init__(self, config: AlertsConfig, mail: Mail, recipients_for: Callable[[str], list[str]],
                 rng: random.Random | None = None) -> None:
        self.config = config
        self.mail = mail
        self.recipients_for = recipients_for  # budget definition -> its own alert_emails
        self._rng = rng or random.Random()
        self._queue: asyncio.Queue[tuple[list[str], dict[str, Any]]] = asyncio.Queue(maxsize=1_000)
        self._task: asyncio.Task[None] | None = None
        self.sleep: Callable[[float], Awaitable[None]] = asyncio.sleep

    def send(self, payload: dict[str, Any]) -> None:
        budget = str(payload.get("definition") or payload.get("budget") or "")
        to = list(dict.fromkeys([*self.config.email.recipients, *self.recipients_for(budget)]))
        if not to:
            return
        try:
            self._queue.put_nowait((to, payload))
        except asyncio.QueueFull:
            mail_deliveries.labels("dropped").inc()
            return
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while not self._queue.empty():
            await self._deliver(*self._queue.get_nowait())

    async def _deliver(self, to: list[str], payload: dict[str, Any]) -> None:
        subject, body = render(payload)
        delay = self.config.backoff_secs
        for attempt in range(1, self.config.max_attempts + 1):
            try:
                await self.mail(to, subject, body)
                mail_deliveries.labels("delivered").inc()
                return
            except ValueError as e:
                log.error("alert mail refused; not retried", extra={"error": str(e), "budget": payload.get("budget")})
                break
            except OSError as e:
                log.warning("alert mail failed", extra={"error": type(e).__name__, "attempt": attempt})
            if attempt < self.config.max_attempts:
                mail_deliveries.labels("retried").inc()
                await self.sleep(delay * (0.5 + self._rng.random()))
                delay *= 2
        mail_deliveries.labels("failed").inc()

    async def drain(self, grace: float) -> None:
        if self._task is not None and not self._task.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._task), grace)
