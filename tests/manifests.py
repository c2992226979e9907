"""Kubernetes objects validated offline: built-in kinds by kubernetes-validate (strict), Istio, Envoy Gateway and
Gateway API kinds by the real upstream CRDs (tests/crds.py), the Prometheus Operator's by tests/schemas/crds.yaml."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

from tests import crds

ROOT = Path(__file__).resolve().parents[1]
K8S_VERSION = "1.30.0"
# The Prometheus Operator's CRDs are not among the upstream ones in ../shared/crds: ServiceMonitor and
# PrometheusRule keep a hand-written schema (tests/schemas/crds.yaml); everything else is checked by tests/crds.py.
CRD_SCHEMAS = yaml.safe_load((ROOT / "tests/schemas/crds.yaml").read_text())


def validate(obj: dict) -> None:
    assert obj["metadata"]["name"]
    key = f"{obj['apiVersion']}/{obj['kind']}"
    group = obj["apiVersion"].split("/")[0]
    if group.endswith(("istio.io", "envoyproxy.io", "gateway.networking.k8s.io")):
        crds.validate(obj)
    elif key in CRD_SCHEMAS["kinds"]:
        schema = {"$defs": CRD_SCHEMAS["$defs"], **CRD_SCHEMAS["kinds"][key]}
        jsonschema.validate(obj["spec"], schema)
    else:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def check_workload(objs: list[dict], external: frozenset | set = frozenset()) -> dict:
    """The nexus-extproc Deployment holds together: selectors select its pods, every volume has one source and
    points at an object that exists (rendered here, or named in `external`), probes use the admin endpoints,
    and it runs as non-root. Returns the objects by (kind, name)."""
    by = {(o["kind"], o["metadata"]["name"]): o for o in objs}
    dep = by[("Deployment", "nexus-extproc")]
    pod = dep["spec"]["template"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    for svc in (o for o in objs if o["kind"] == "Service" and o["metadata"]["name"].startswith("nexus-extproc")):
        assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    for v in pod["spec"]["volumes"]:
        assert len(set(v) - {"name"}) == 1, f"volume {v['name']} has more than one source"
        for kind, ref in (("ConfigMap", v.get("configMap", {}).get("name")),
                          ("Secret", v.get("secret", {}).get("secretName")),
                          ("PersistentVolumeClaim", v.get("persistentVolumeClaim", {}).get("claimName"))):
            if ref:
                assert (kind, ref) in by or (kind, ref) in external, f"{kind} {ref} is referenced but not rendered"
    c = pod["spec"]["containers"][0]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz" and c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    return by
