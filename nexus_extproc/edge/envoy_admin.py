"""Polls Envoy's admin `/clusters?format=json`; what the answer means for routing is ops/health.py's."""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from nexus_extproc.config import NexusConfig
from nexus_extproc.ops import metrics
from nexus_extproc.ops.health import local_unhealthy
from nexus_extproc.request.router import Router

log = logging.getLogger(__name__)


async def poll_envoy_health(config: NexusConfig, router: Router) -> None:
    url = config.server.envoy_admin_url
    if not url:
        return
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while True:
            try:
                with metrics.reconciler_duration.labels("EnvoyHealthPoller").time():
                    async with session.get(f"{url.rstrip('/')}/clusters?format=json") as r:
                        doc = await r.json(content_type=None)
                down = local_unhealthy(config, doc)
                if down != router.unhealthy:
                    log.info("local backend health changed", extra={"unhealthy": ",".join(sorted(down)) or "-"})
                router.unhealthy = down
            except (aiohttp.ClientError, TimeoutError, ValueError):
                pass  # keep the last known state; Envoy may be restarting
            await asyncio.sleep(config.server.health_poll_secs)
