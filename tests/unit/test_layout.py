"""The package's layering, checked by walking every module's imports (ast, no execution)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "nexus_extproc"
WIRE = ("grpc", "grpc_health", "aiohttp", "envoy", "google.protobuf", "xds", "udpa", "validate")
# The edge owns the wire; app composes; api/ is generated protobuf code.
WIRE_ALLOWED = ("edge/", "app.py", "api/")


def imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def modules() -> list[tuple[str, set[str]]]:
    return [(str(p.relative_to(PKG)), imports(p)) for p in sorted(PKG.rglob("*.py"))]


def test_only_the_edge_and_app_touch_grpc_protobuf_http_or_envoy():
    bad = {}
    for rel, names in modules():
        if rel.startswith(WIRE_ALLOWED):
            continue
        wire = sorted(n for n in names
                      if any(n == w or n.startswith(w + ".") for w in WIRE) or n.endswith(("_pb2", "_pb2_grpc")))
        if wire:
            bad[rel] = wire
    assert not bad, bad


def test_nothing_below_the_edge_imports_it():
    bad = {rel: sorted(n for n in names if n.startswith(("nexus_extproc.edge", "nexus_extproc.app")))
           for rel, names in modules() if not rel.startswith(("edge/", "app.py", "cli.py"))}
    assert not {k: v for k, v in bad.items() if v}, bad


def test_the_walk_sees_the_wire_where_it_is():
    """Guards the two tests above against a walk that finds nothing."""
    found = dict(modules())
    assert "grpc" in found["edge/extproc.py"] and "aiohttp" in found["edge/webhook.py"]
    assert any(n.startswith("nexus_extproc.edge") for n in found["app.py"])


def test_the_runtime_package_never_imports_the_dev_tooling():
    bad = {rel: sorted(n for n in names if n.split(".")[0] == "nexus_dev") for rel, names in modules()}
    assert not {k: v for k, v in bad.items() if v}, bad


def test_budget_and_ledger_know_nothing_of_client_apis_or_the_request_path():
    """A refusal leaves the budget as a value (Rejection, BudgetStoreDown); the request layer renders it."""
    bad = {rel: sorted(n for n in names if n.startswith(("nexus_extproc.apis", "nexus_extproc.request")))
           for rel, names in modules() if rel.startswith(("budget/", "ledger/"))}
    assert not {k: v for k, v in bad.items() if v}, bad


def test_metering_sits_below_the_api_profiles():
    """Metering (tokens, prices, usage) is what the API profiles use; it never reaches up to them."""
    bad = {rel: sorted(n for n in names if n.startswith(("nexus_extproc.apis", "nexus_extproc.request",
                                                          "nexus_extproc.budget", "nexus_extproc.edge")))
           for rel, names in modules() if rel.startswith("metering/")}
    assert not {k: v for k, v in bad.items() if v}, bad


def test_the_admin_edges_go_through_the_budget_facade_not_the_store():
    """The admin edges take budget.admin.BudgetAdmin; neither imports the ledger nor touches `.ledger`."""
    for rel in ("edge/admin_http.py", "edge/admin_grpc.py"):
        tree = ast.parse((PKG / rel).read_text())
        reach = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr in ("ledger", "book")]
        assert not reach, f"{rel} reaches into the store at lines {reach}"
        assert "nexus_extproc.budget.admin" in imports(PKG / rel)


def test_no_class_carries_more_than_a_dozen_public_methods():
    """The ledgers implement four small protocols (SpendLedger, ControlStore, SpendLog, CalibrationStore) and are
    the one allowed exception: their surface is the sum of those contracts."""
    allowed = {"SqliteLedger", "RedisLedger", "FaultyLedger"}
    big = {}
    for path in sorted(PKG.rglob("*.py")):
        if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name not in allowed:
                public = [m.name for m in node.body if isinstance(m, ast.FunctionDef | ast.AsyncFunctionDef)
                          and not m.name.startswith("_")]
                if len(set(public)) > 13:
                    big[f"{path.relative_to(PKG)}:{node.name}"] = len(set(public))
    assert not big, big
