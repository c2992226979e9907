"""Every manifest in deploy/ parses and validates offline; Kustomize overlays render; Envoy snippets load."""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from nexus_dev.envoy_config import settlement_filters
from nexus_dev.stack import envoy_binary
from tests import kustomize
from tests.manifests import check_workload, validate

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = ["base", "overlays/sqlite-single", "overlays/redis-ha"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kustomize_renders_and_validates(overlay):
    objs = kustomize.build(ROOT / "deploy/kubernetes" / overlay)
    kinds = {o["kind"] for o in objs}
    assert {"Deployment", "Service", "ConfigMap", "Secret", "PodDisruptionBudget", "ServiceMonitor"} <= kinds
    for o in objs:
        validate(o)
    by = check_workload(objs)
    dep = by[("Deployment", "nexus-extproc")]
    pod = dep["spec"]["template"]
    # The shipped config inside the ConfigMap is one the server accepts.
    from nexus_extproc.config import parse_config

    cfg = parse_config(yaml.safe_load(by[("ConfigMap", "nexus-extproc-config")]["data"]["config.yaml"]), environ={})
    if overlay == "overlays/redis-ha":
        assert cfg.store.kind == "redis" and dep["spec"]["replicas"] == 3
    if overlay == "overlays/sqlite-single":
        assert cfg.store.kind == "sqlite" and dep["spec"]["strategy"]["type"] == "Recreate"
        assert any("persistentVolumeClaim" in v for v in pod["spec"]["volumes"])


def _norm(v: object) -> object:
    """Order of named list items is not meaningful (kustomize moves patched ones first)."""
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items()}
    if isinstance(v, list):
        items = [_norm(x) for x in v]
        if all(isinstance(x, dict) and "name" in x for x in items):
            return sorted(items, key=lambda x: x["name"])  # type: ignore[index]
        return items
    return v


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed; the renderer above stands in")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_renderer_agrees_with_kubectl_kustomize(overlay):
    out = subprocess.run(["kubectl", "kustomize", str(ROOT / "deploy/kubernetes" / overlay)], capture_output=True,
                         text=True, timeout=60)
    if out.returncode != 0:
        pytest.skip(f"kubectl kustomize unavailable: {out.stderr[:200]}")
    theirs = {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(out.stdout) if o}
    ours = {(o["kind"], o["metadata"]["name"]): o for o in kustomize.build(ROOT / "deploy/kubernetes" / overlay)}
    assert set(theirs) == set(ours)
    for k in ours:
        assert _norm(ours[k].get("spec")) == _norm(theirs[k].get("spec")), k
        assert ours[k].get("data") == theirs[k].get("data"), k
        assert ours[k]["metadata"].get("labels") == theirs[k]["metadata"].get("labels"), k


@pytest.mark.parametrize("path", sorted((ROOT / "deploy").glob("istio/*.yaml")) + sorted(
    (ROOT / "deploy").glob("envoy-gateway/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_mesh_manifests_validate(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for d in docs:
        validate(d)


def test_crd_schemas_reject_mistakes():
    """A wrong enum, a misspelt key deep in a spec, a deprecated version: each fails the real CRDs."""
    good = next(yaml.safe_load_all((ROOT / "deploy/envoy-gateway/extension-policy.yaml").read_text()))
    validate(good)
    bad = copy.deepcopy(good)
    bad["spec"]["extProc"][0]["processingMode"]["request"]["body"] = "Bufferd"
    with pytest.raises(jsonschema.ValidationError):
        validate(bad)
    bad = copy.deepcopy(good)
    bad["spec"]["extProc"][0]["processingMode"]["request"]["bodyy"] = "Buffered"
    with pytest.raises(jsonschema.ValidationError):
        validate(bad)
    tls = {"apiVersion": "gateway.networking.k8s.io/v1alpha3", "kind": "BackendTLSPolicy",
           "metadata": {"name": "x"}, "spec": {}}
    with pytest.raises(AssertionError, match="deprecated"):
        validate(tls)


def _envoy_validate(cfg: dict, tmp_path: Path) -> None:
    f = tmp_path / "envoy.yaml"
    f.write_text(yaml.safe_dump(cfg))
    r = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(f)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout[-1500:] + r.stderr[-1500:]


@pytest.mark.parametrize("path", sorted(ROOT.glob("envoy/**/*.yaml")), ids=lambda p: p.name)
def test_every_envoy_config_in_repo_validates(path, tmp_path):
    _envoy_validate(yaml.safe_load(path.read_text()), tmp_path)


@pytest.mark.parametrize("name", ["envoyfilter-egress.yaml", "envoyfilter-ingress.yaml",
                                  "envoyfilter-egress-envoy-settlement.yaml"])
def test_istio_envoyfilter_patch_is_a_valid_envoy_filter(name, tmp_path):
    """Every filter the EnvoyFilter inserts before the router, in its order, and the access log it merges into
    the connection manager, loaded by the real Envoy in a minimal listener."""
    ef = yaml.safe_load((ROOT / "deploy/istio" / name).read_text())
    inserted = [p["patch"]["value"] for p in ef["spec"]["configPatches"] if p["applyTo"] == "HTTP_FILTER"]
    merged = [p["patch"]["value"]["typed_config"] for p in ef["spec"]["configPatches"]
              if p["applyTo"] == "NETWORK_FILTER"]
    cluster = inserted[0]["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"]
    cfg = yaml.safe_load((ROOT / "envoy/nexus.yaml").read_text())
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"] = [*inserted, hcm["http_filters"][-1]]
    for m in merged:
        hcm["access_log"] = [*hcm.get("access_log", []), *m.get("access_log", [])]
    cfg["static_resources"]["clusters"][0]["name"] = cluster
    cfg["static_resources"]["clusters"][0]["load_assignment"]["cluster_name"] = cluster
    # The connection manager's routes of envoy/nexus.yaml read metadata the mesh does not set: a plain route.
    hcm["route_config"]["virtual_hosts"][0]["routes"] = [{"match": {"prefix": "/"},
                                                          "route": {"cluster_header": "x-nexus-upstream"}}]
    if "settlement" in name:
        names = [f["name"] for f in inserted]
        assert names == ["envoy.filters.http.ext_proc", *(f["name"] for f in settlement_filters())]
        assert any(a["name"] == "envoy.access_loggers.http_grpc" for a in hcm["access_log"])
    _envoy_validate(cfg, tmp_path)
