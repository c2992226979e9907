"""Envoy's own view of backend health, polled from its admin `/clusters?format=json`.

A soft-limit reroute to a local model that is down would turn a budget nudge into an outage, so reroutes
only go to local backends Envoy's active health checks currently pass. Without an admin URL configured,
local backends are assumed up (documented).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp

from nexus_extproc.config import NexusConfig
from nexus_extproc.router import Router

log = logging.getLogger("nexus_extproc.health")


def unhealthy_clusters(doc: dict[str, Any]) -> set[str]:
    """Clusters with no host that passes health checks."""
    down = set()
    for c in doc.get("cluster_statuses", []):
        hosts = c.get("host_statuses", [])
        healthy = [h for h in hosts if not any(
            v is True for k, v in h.get("health_status", {}).items() if k.startswith("failed"))
            and h.get("health_status", {}).get("eds_health_status", "HEALTHY") == "HEALTHY"]
        if not healthy:
            down.add(c.get("name", ""))
    return down


async def poll_envoy_health(config: NexusConfig, router: Router) -> None:
    url = config.server.envoy_admin_url
    if not url:
        return
    local = {b.cluster: name for name, b in config.backends.items() if b.type == "local"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while True:
            try:
                async with session.get(f"{url.rstrip('/')}/clusters?format=json") as r:
                    doc = await r.json(content_type=None)
                down = {local[c] for c in unhealthy_clusters(doc) if c in local}
                if down != router.unhealthy:
                    log.info("local backend health changed", extra={"unhealthy": ",".join(sorted(down)) or "-"})
                router.unhealthy = down
            except (aiohttp.ClientError, TimeoutError, ValueError):
                pass  # keep the last known state; Envoy may be restarting
            await asyncio.sleep(config.server.health_poll_secs)
