"""Custom resources validated against the real upstream CRDs in ../shared/crds (Istio, Envoy Gateway, Gateway
API 1.6.1): each version's openAPIV3Schema, made strict (an unknown field anywhere is an error: the CRDs do not
say so themselves), and no deprecated version. Tests skip with the reason when ../shared is absent."""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

SHARED_CRDS = Path(__file__).resolve().parents[2] / "shared" / "crds"


@cache
def registry() -> dict[str, dict[str, Any]]:
    """`group/version/Kind` -> {"schema": strict schema, "deprecated": bool, "storage": bool}."""
    if not SHARED_CRDS.is_dir():
        pytest.skip(f"{SHARED_CRDS} is absent: the real CRDs come from the shared workspace")
    out: dict[str, dict[str, Any]] = {}
    for f in sorted(SHARED_CRDS.glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            for v in spec["versions"]:
                schema = (v.get("schema") or {}).get("openAPIV3Schema")
                if schema is None:
                    continue
                out[f"{spec['group']}/{v['name']}/{spec['names']['kind']}"] = {
                    "schema": strict(schema), "deprecated": bool(v.get("deprecated")), "storage": v.get("storage"),
                    "source": f.name}
    return out


def strict(schema: Any) -> Any:
    """Every object schema that lists its properties refuses others, unless it preserves unknown fields."""
    s = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(s)
    # metadata is the API server's (ObjectMeta): the CRD schemas leave it open or list only name/namespace.
    props = s.setdefault("properties", {})
    props["metadata"] = {"type": "object"}
    props.setdefault("apiVersion", {"type": "string"})
    props.setdefault("kind", {"type": "string"})
    return s


def known(obj: dict[str, Any]) -> bool:
    group = obj["apiVersion"].split("/")[0]
    return any(k.startswith(group + "/") for k in registry()) if "/" in obj["apiVersion"] else False


def validate(obj: dict[str, Any]) -> None:
    key = f"{obj['apiVersion']}/{obj['kind']}"
    entry = registry().get(key)
    assert entry is not None, f"{key}: no such version in the upstream CRDs"
    assert not entry["deprecated"], f"{key} is deprecated upstream ({entry['source']}): move to the storage version"
    try:
        jsonschema.validate(obj, entry["schema"])
    except jsonschema.ValidationError as e:  # the schema is huge: name the place and the reason only
        raise jsonschema.ValidationError(f"{key} {obj['metadata'].get('name')}: {'/'.join(map(str, e.absolute_path))}: "
                                         f"{e.message}") from None
