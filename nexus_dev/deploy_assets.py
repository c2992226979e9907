"""`python -m nexus_dev.deploy_assets`: the plain manifests in deploy/ rendered from the Helm chart, so the
chart is the one source of truth (`make deploy-assets`; a test fails when a file is stale).

- deploy/kubernetes/base/nexus-extproc.yaml: the workload as Kustomize's base (SQLite on an emptyDir, which
  the sqlite-single overlay swaps for a volume; a placeholder admin token to replace).
- deploy/kubernetes/overlays/redis-ha/config.yaml: the server config with the Redis store.
- deploy/istio/envoyfilter-{egress,ingress}.yaml and deploy/envoy-gateway/extension-policy.yaml: the mesh hooks.

Rendered with real Helm (helm-python-sdk, a dev dependency) offline, as release `nexus-extproc` in namespace
`nexus`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "deploy" / "helm" / "nexus-extproc"
RELEASE, NAMESPACE = "nexus-extproc", "nexus"
HEADER = "# Generated from deploy/helm/nexus-extproc by `make deploy-assets` (python -m nexus_dev.deploy_assets).\n"
# Labels that change with every chart release or say Helm manages the object: not for plain manifests.
_HELM_ONLY = ("helm.sh/chart", "app.kubernetes.io/managed-by")


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    import helm_python as helm

    chart = helm.Chart.load(str(CHART))
    out = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objs = []
    for path in sorted(out):
        if not path.endswith(".yaml"):
            continue
        for doc in yaml.safe_load_all(out[path]):
            if doc:
                for key in _HELM_ONLY:
                    doc["metadata"].get("labels", {}).pop(key, None)
                doc["metadata"].get("annotations", {}).pop("checksum/config", None)
                tmpl = doc.get("spec", {}).get("template", {}).get("metadata", {})
                for key in _HELM_ONLY:
                    tmpl.get("labels", {}).pop(key, None)
                if tmpl.get("annotations") is not None:
                    tmpl["annotations"].pop("checksum/config", None)
                    if not tmpl["annotations"]:
                        del tmpl["annotations"]
                objs.append(doc)
    return objs


def dump(objs: list[dict[str, Any]], note: str = "") -> str:
    return HEADER + note + "---\n".join(yaml.safe_dump(o, sort_keys=False, width=120) for o in objs)


LOCAL_REPLY = CHART / "files" / "local-reply.yaml"


def local_reply_text() -> str:
    from nexus_dev.envoy_config import local_reply_config

    class NoAliases(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:
            return True

    return ("# Generated from nexus_dev/envoy_config.py by `make deploy-assets`: envoy/nexus.yaml's local replies.\n"
            + yaml.dump(local_reply_config(), Dumper=NoAliases, sort_keys=False, width=120))


SETTLEMENT_FILTERS = CHART / "files" / "settlement-filters.yaml"


def settlement_filters_text() -> str:
    from nexus_dev.envoy_config import settlement_filters

    return ("# Generated from nexus_dev/envoy_config.py by `make deploy-assets`: the filters settlement: envoy adds.\n"
            + yaml.safe_dump(settlement_filters(), sort_keys=False, width=120))


def assets() -> dict[Path, str]:
    base = render({"store": {"sqlite": {"persistence": {"enabled": False}}}, "serviceMonitor": {"enabled": True},
                   "adminToken": {"value": "change-me-with-a-real-secret"}})
    redis = render({"store": {"kind": "redis", "redis": {"url": "redis://nexus-redis:6379/0"}}})
    redis_cfg = next(o for o in redis if o["kind"] == "ConfigMap")["data"]["config.yaml"]
    # The chart's shared secret is random per install: plain manifests go without it (docs/kubernetes.md).
    untokened = {"envoyToken": {"enabled": False}}
    egress = render({"istio": {"envoyFilter": {"enabled": True}}, **untokened})
    egress_envoy = render({"istio": {"envoyFilter": {"enabled": True}}, "settlement": "envoy", **untokened})
    ingress = render({"istio": {"envoyFilter": {"enabled": True, "gateway": "ingressgateway"}}, **untokened})
    eg = render({"envoyGateway": {"extensionPolicy": {"enabled": True}}})

    def kinds(objs: list[dict[str, Any]], *names: str) -> list[dict[str, Any]]:
        return [o for o in objs if o["kind"] in names]

    return {
        REPO / "deploy/kubernetes/base/nexus-extproc.yaml": dump(base),
        REPO / "deploy/kubernetes/overlays/redis-ha/config.yaml": HEADER + redis_cfg,
        REPO / "deploy/istio/envoyfilter-egress.yaml": dump(kinds(egress, "EnvoyFilter")),
        REPO / "deploy/istio/envoyfilter-ingress.yaml": dump(kinds(ingress, "EnvoyFilter")),
        REPO / "deploy/istio/envoyfilter-egress-envoy-settlement.yaml": dump(
            kinds(egress_envoy, "EnvoyFilter"),
            "# settlement: envoy (docs/streaming.md); the server's config needs server.settlement: envoy too.\n"),
        REPO / "deploy/envoy-gateway/extension-policy.yaml": dump(kinds(eg, "EnvoyExtensionPolicy", "ReferenceGrant")),
    }


if __name__ == "__main__":
    LOCAL_REPLY.write_text(local_reply_text())  # first: the chart renders them into the Istio EnvoyFilter
    SETTLEMENT_FILTERS.write_text(settlement_filters_text())
    for path, text in {LOCAL_REPLY: local_reply_text(), SETTLEMENT_FILTERS: settlement_filters_text(),
                       **assets()}.items():
        path.write_text(text)
        print(path.relative_to(REPO), file=sys.stderr)
