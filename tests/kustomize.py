"""A small Kustomize renderer for the subset deploy/kubernetes uses (resources, namespace, labels,
configMap/secret generators, strategic-merge patches), so `kustomize build` can be checked in CI without a
Go binary. Where `kubectl` is installed, the tests also compare against `kubectl kustomize`."""

from __future__ import annotations

import base64
import copy
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]


def _merge(base: Any, patch: Any) -> Any:
    """Strategic merge as Kubernetes does it for these manifests: maps merge, lists of named maps merge by
    name, other lists and scalars are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)  # strategic merge: null deletes the key
            else:
                out[k] = _merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    if (isinstance(base, list) and isinstance(patch, list) and patch
            and all(isinstance(x, dict) and "name" in x for x in base + patch)):
        out_l = [copy.deepcopy(x) for x in base]
        for item in patch:
            for i, cur in enumerate(out_l):
                if cur["name"] == item["name"]:
                    out_l[i] = _merge(cur, item)
                    break
            else:
                out_l.append(copy.deepcopy(item))
        return out_l
    return copy.deepcopy(patch)


def _generated(spec: Obj, kind: str, base_dir: Path) -> Obj:
    data: dict[str, str] = {}
    for f in spec.get("files", []):
        key, _, path = f.partition("=") if "=" in f else (Path(f).name, "", f)
        data[key] = (base_dir / path).read_text()
    for lit in spec.get("literals", []):
        k, _, v = lit.partition("=")
        data[k] = v
    obj: Obj = {"apiVersion": "v1", "kind": kind, "metadata": {"name": spec["name"]}}
    if kind == "Secret":
        obj["type"] = "Opaque"
        obj["data"] = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    else:
        obj["data"] = data
    return obj


def _key(o: Obj) -> tuple[str, str]:
    return o["kind"], o["metadata"]["name"]


def build(directory: Path) -> list[Obj]:
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    objs: list[Obj] = []
    for res in k.get("resources", []):
        p = directory / res
        if p.is_dir():
            objs += build(p)
        else:
            objs += [d for d in yaml.safe_load_all(p.read_text()) if d]
    for kind, field in (("ConfigMap", "configMapGenerator"), ("Secret", "secretGenerator")):
        for spec in k.get(field, []):
            new = _generated(spec, kind, directory)
            behavior = spec.get("behavior", "create")
            existing = [i for i, o in enumerate(objs) if _key(o) == _key(new)]
            if behavior == "create" and existing:
                raise ValueError(f"{kind} {spec['name']} generated twice")
            if behavior in ("replace", "merge") and not existing:
                raise ValueError(f"{kind} {spec['name']}: nothing to {behavior}")
            if existing:
                old = objs[existing[0]]
                if behavior == "replace":  # data replaced; metadata (labels from the base) kept
                    new["metadata"] = _merge(old["metadata"], new["metadata"])
                    objs[existing[0]] = new
                else:
                    objs[existing[0]] = _merge(old, new)
            else:
                objs.append(new)
    for patch in k.get("patches", []):
        doc = yaml.safe_load((directory / patch["path"]).read_text())
        idx = [i for i, o in enumerate(objs) if _key(o) == _key(doc)]
        if not idx:
            raise ValueError(f"patch {patch['path']} matches nothing")
        objs[idx[0]] = _merge(objs[idx[0]], doc)
    for lab in k.get("labels", []):
        for o in objs:
            o.setdefault("metadata", {}).setdefault("labels", {}).update(lab["pairs"])
            if lab.get("includeSelectors"):
                _add_selector_labels(o, lab["pairs"])
    if "namespace" in k:
        for o in objs:
            o["metadata"]["namespace"] = k["namespace"]
    return objs


def _add_selector_labels(o: Obj, pairs: dict[str, str]) -> None:
    spec = o.get("spec", {})
    if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "PodDisruptionBudget"):
        spec.setdefault("selector", {}).setdefault("matchLabels", {}).update(pairs)
    if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet"):
        spec["template"].setdefault("metadata", {}).setdefault("labels", {}).update(pairs)
    if o["kind"] == "Service":
        spec.setdefault("selector", {}).update(pairs)
