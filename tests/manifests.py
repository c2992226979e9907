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
