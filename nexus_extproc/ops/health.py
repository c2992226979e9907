"""Envoy's own view of backend health, from its admin `/clusters?format=json` (polled by edge/envoy_admin.py).

A soft-limit reroute to a local model that is down would turn a budget nudge into an outage, so reroutes
only go to local backends Envoy's active health checks currently pass. Without an admin URL configured,
local backends are assumed up (documented).
"""

from __future__ import annotations

from typing import Any

from nexus_extproc.config import NexusConfig


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


def local_unhealthy(config: NexusConfig, doc: dict[str, Any]) -> set[str]:
    """The local backends (by name) whose Envoy cluster has no host passing its health checks."""
    local = {b.cluster: name for name, b in config.backends.items() if b.type == "local"}
    return {local[c] for c in unhealthy_clusters(doc) if c in local}
