"""The Helm chart rendered and linted by real Helm (helm-python-sdk, offline) for the value combinations users
pick, every rendered object validated (tests/manifests.py), and the plain manifests in deploy/ generated from
it (one source of truth)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from nexus_dev.deploy_assets import CHART, LOCAL_REPLY, assets, local_reply_text, settlement_filters_text
from nexus_extproc.config import parse_config
from tests.manifests import check_workload, validate

helm = pytest.importorskip("helm_python", reason="helm-python-sdk is a dev dependency (make installs it)")

COMBOS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "sqlite-emptydir": {"store": {"sqlite": {"persistence": {"enabled": False}}}},
    "sqlite-existing-claim": {"store": {"sqlite": {"persistence": {"existingClaim": "my-ledger"}}}},
    "redis-url": {"store": {"kind": "redis", "redis": {"url": "redis://redis:6379/0"}}, "replicaCount": 3,
                  "workers": 2},
    "redis-cluster-secret": {"store": {"kind": "redis", "failure": "open",
                                       "redis": {"existingSecret": "redis-creds", "cluster": True}},
                             "adminToken": {"existingSecret": "my-admin"}},
    "everything-on": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True},
                      "networkPolicy": {"enabled": True, "grpcFrom": [{"namespaceSelector": {"matchLabels": {
                          "kubernetes.io/metadata.name": "istio-system"}}}]},
                      "istio": {"envoyFilter": {"enabled": True}},
                      "envoyGateway": {"extensionPolicy": {"enabled": True}}},
    "istio-ingress": {"istio": {"envoyFilter": {"enabled": True, "gateway": "ingressgateway"}}},
    "existing-configmap": {"existingConfigMap": "my-config", "podDisruptionBudget": {"enabled": False}},
}


def render(values: dict[str, Any], name: str = "nexus-extproc") -> list[dict[str, Any]]:
    out = helm.Chart.load(str(CHART)).render(values, name=name, namespace="nexus", is_install=True)
    return [d for path, text in sorted(out.items()) if path.endswith(".yaml")
            for d in yaml.safe_load_all(text) if d]


@pytest.mark.parametrize("combo", sorted(COMBOS))
def test_the_chart_lints_clean(combo):
    report = helm.lint(str(CHART), COMBOS[combo], strict=True, kube_version="v1.30.0")
    assert not report["errors"], report
    assert not [m for m in report["messages"] if m["severity"] >= 2], report["messages"]


@pytest.mark.parametrize("combo", sorted(COMBOS))
def test_every_rendered_object_validates_and_the_workload_holds_together(combo):
    values = COMBOS[combo]
    objs = render(values)
    for o in objs:
        validate(o)
    external = {("ConfigMap", values.get("existingConfigMap")), ("Secret", values.get("adminToken", {}).get(
        "existingSecret")), ("PersistentVolumeClaim", "my-ledger")}
    by = check_workload(objs, external)
    dep = by[("Deployment", "nexus-extproc")]
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert dep["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 65532
    assert c["securityContext"]["readOnlyRootFilesystem"]
    store = values.get("store", {})
    if ("ConfigMap", "nexus-extproc-config") in by:
        cfg = parse_config(yaml.safe_load(by[("ConfigMap", "nexus-extproc-config")]["data"]["config.yaml"]),
                           environ={})
        assert cfg.store.kind == store.get("kind", "sqlite") and cfg.server.workers == values.get("workers", 1)
        assert cfg.store_failure == store.get("failure", "closed")
        assert cfg.admin_api.token_file == "/etc/nexus/admin/token"
    if store.get("kind") == "redis":
        env = {e["name"]: e for e in c["env"]}
        assert "NEXUS_STORE__URL" in env and dep["spec"].get("strategy") is None
    else:
        assert dep["spec"]["strategy"]["type"] == "Recreate"
    if combo == "everything-on":
        rule = by[("PrometheusRule", "nexus-extproc")]
        rules_file = yaml.safe_load((CHART / "files" / "prometheus-rules.yaml").read_text())
        assert rule["spec"] == rules_file
        assert {o["kind"] for o in objs} >= {"ServiceMonitor", "NetworkPolicy", "EnvoyFilter", "EnvoyExtensionPolicy",
                                              "ReferenceGrant", "PodDisruptionBudget"}


def test_bad_values_fail_at_install():
    chart = helm.Chart.load(str(CHART))
    for bad in ({"store": {"kind": "postgres"}}, {"workers": 0}, {"config": {"store": {"kind": "sqlite"}}},
                {"replicas": 3}, {"serviceMonitor": {"interval": "often"}},
                {"istio": {"envoyFilter": {"gateway": "sidecar"}}}):
        with pytest.raises(helm.HelmError):
            chart.render(bad, name="nexus-extproc", namespace="nexus")
    with pytest.raises(helm.HelmError, match=r"store\.redis\.url or store\.redis\.existingSecret"):
        chart.render({"store": {"kind": "redis"}}, name="nexus-extproc", namespace="nexus")


def test_a_release_name_prefixes_every_object():
    objs = render({"serviceMonitor": {"enabled": True}}, name="team-a")
    assert {o["metadata"]["name"] for o in objs} >= {"team-a-nexus-extproc", "team-a-nexus-extproc-grpc",
                                                      "team-a-nexus-extproc-config", "team-a-nexus-extproc-admin"}


def test_the_plain_manifests_in_deploy_are_rendered_from_the_chart():
    expected = {LOCAL_REPLY: local_reply_text(), **assets()}
    stale = [str(p) for p, text in expected.items() if not p.exists() or p.read_text() != text]
    assert not stale, f"stale (run `make deploy-assets`): {stale}"


def test_the_generated_admin_token_is_random_unless_given():
    a, b = render({}), render({})
    tok = [next(o for o in objs if o["kind"] == "Secret")["data"]["token"] for objs in (a, b)]
    assert tok[0] != tok[1] and len(tok[0]) >= 40
    given = next(o for o in render({"adminToken": {"value": "s3cret"}}) if o["kind"] == "Secret")
    assert given["data"]["token"] == "czNjcmV0"


def test_istio_gateway_answers_envoys_own_errors_in_the_clients_shape():
    """Issue 26: the Istio EnvoyFilter carries envoy/nexus.yaml's local_reply_config (413/503/504 in the provider's
    error shape, the server's own refusals left alone); one value turns it off."""
    from nexus_dev.deploy_assets import render
    from nexus_dev.envoy_config import local_reply_config

    def patches(values: dict) -> list[dict]:
        ef = next(o for o in render(values) if o["kind"] == "EnvoyFilter")
        return [p for p in ef["spec"]["configPatches"] if p["applyTo"] == "NETWORK_FILTER"]

    on = patches({"istio": {"envoyFilter": {"enabled": True}}})
    assert on[0]["patch"]["value"]["typed_config"]["local_reply_config"] == local_reply_config()
    assert patches({"istio": {"envoyFilter": {"enabled": True, "localReplies": False}}}) == []


def test_settlement_envoy_sets_the_server_and_the_gateway_together():
    """One value switches both sides: the server waits for Envoy's report only where the gateway sends one."""
    objs = render({"settlement": "envoy", "istio": {"envoyFilter": {"enabled": True}}})
    cfg = parse_config(yaml.safe_load(next(o for o in objs if o["kind"] == "ConfigMap")["data"]["config.yaml"]),
                       environ={})
    assert cfg.server.settlement == "envoy"
    ef = next(o for o in objs if o["kind"] == "EnvoyFilter")
    names = [p["patch"]["value"].get("name") for p in ef["spec"]["configPatches"]]
    from nexus_dev.envoy_config import settlement_filters

    # All of them, in their order (each inserted before the router): json_to_metadata's response rules last.
    wanted = [f["name"] for f in settlement_filters()]
    assert [n for n in names if n in wanted] == wanted and wanted[-1].startswith("envoy.filters.http.json_to_metadata")
    logs = [a for p in ef["spec"]["configPatches"] if p["applyTo"] == "NETWORK_FILTER"
            for a in p["patch"]["value"]["typed_config"].get("access_log", [])]
    assert [a["name"] for a in logs] == ["envoy.access_loggers.http_grpc"]
    plain = render({"istio": {"envoyFilter": {"enabled": True}}})
    assert parse_config(yaml.safe_load(next(o for o in plain if o["kind"] == "ConfigMap")["data"]["config.yaml"]),
                        environ={}).server.settlement == "ext_proc"
    assert "envoy.filters.http.sse_to_metadata" not in yaml.safe_dump(plain)
    assert (CHART / "files" / "settlement-filters.yaml").read_text() == settlement_filters_text()


def _mappings(x: Any) -> Iterator[dict]:
    """Every mapping in a rendered object, depth first."""
    if isinstance(x, dict):
        yield x
        for v in x.values():
            yield from _mappings(v)
    elif isinstance(x, list):
        for v in x:
            yield from _mappings(v)


def test_the_istio_gateway_and_the_server_share_one_random_envoy_token():
    """Issue 27: only the gateway's Envoy may open ext_proc and access-log streams. With the Istio EnvoyFilter the
    chart makes one token per install, gives it to the server (NEXUS_ENVOY_TOKEN from the Secret) and puts the same
    value in both grpc_services' initial_metadata; none where the chart does not configure the gateway."""
    import base64

    def tokens(values: dict) -> tuple[str | None, list[str], list[dict]]:
        objs = render(values)
        sec = next((o for o in objs if o["kind"] == "Secret" and o["metadata"]["name"].endswith("-envoy")), None)
        ef = next((o for o in objs if o["kind"] == "EnvoyFilter"), None)
        sent = [d["value"] for d in _mappings(ef) if d.get("key") == "x-nexus-envoy-token"]
        env = next(o for o in objs if o["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0].get(
            "env", [])
        return (base64.b64decode(sec["data"]["token"]).decode() if sec else None), sent, env

    istio = {"settlement": "envoy", "istio": {"envoyFilter": {"enabled": True}}}
    secret, sent, env = tokens(istio)
    assert secret and len(secret) >= 32 and sent == [secret, secret]  # ext_proc's and the access logger's
    assert {"name": "NEXUS_ENVOY_TOKEN", "valueFrom": {"secretKeyRef": {
        "name": "nexus-extproc-envoy", "key": "token"}}} in env
    cfg = yaml.safe_load(next(o for o in render(istio) if o["kind"] == "ConfigMap")["data"]["config.yaml"])
    assert parse_config(cfg, environ={}).server.envoy_token_env == "NEXUS_ENVOY_TOKEN"  # what the server reads
    assert tokens(istio)[0] != secret  # random per install (an upgrade keeps the Secret's, via lookup)
    assert tokens({**istio, "envoyToken": {"value": "given-token"}})[1] == ["given-token", "given-token"]
    assert tokens({**istio, "envoyToken": {"enabled": False}}) == (None, [], [])
    assert tokens({"settlement": "envoy"}) == (None, [], [])  # no gateway of ours to give it to
