"""The admin gRPC API through a real channel: auth on every method, runtime limits, overrides, watch."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf import timestamp_pb2

from nexus_extproc.api import budget_admin_pb2 as pb
from nexus_extproc.api import budget_admin_pb2_grpc as pb_grpc
from nexus_extproc.app import build
from nexus_extproc.budget.policy import Action, Target
from nexus_extproc.edge.admin_grpc import start_admin_api
from tests.conftest import make_config

TOKEN = "s3cret-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


class Clock:
    def __init__(self) -> None:
        self.t = datetime(2026, 11, 10, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.t


@pytest.fixture
async def admin(counter, tmp_path):
    comps = build(make_config(budget={"monthly_limit_usd": 10}, store={"kind": "sqlite",
                                                                          "path": str(tmp_path / "l.db")}), counter)
    clock = Clock()
    comps.budget.clock = clock
    server, port = await start_admin_api(comps.budget.admin, "127.0.0.1", 0, TOKEN)
    ch = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield comps, pb_grpc.BudgetAdminServiceStub(ch), clock
    await ch.close()
    await server.stop(0)


CALLS = [
    ("GetStatus", pb.GetStatusRequest()),
    ("SetLimit", pb.SetLimitRequest(name="global", limit_micros=1)),
    ("SetOverride", pb.SetOverrideRequest(name="global", limit_micros=1)),
    ("ListSpend", pb.ListSpendRequest()),
    ("ListAudit", pb.ListAuditRequest()),
    ("ResetLimit", pb.ResetLimitRequest(name="global")),
]


@pytest.mark.parametrize("metadata", [None, (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)])
@pytest.mark.parametrize(("method", "request_"), CALLS)
async def test_every_method_requires_the_token(admin, method, request_, metadata):
    _, stub, _ = admin
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await getattr(stub, method)(request_, metadata=metadata)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_watch_requires_the_token(admin):
    _, stub, _ = admin
    with pytest.raises(grpc.aio.AioRpcError) as e:
        async for _ in stub.WatchStatus(pb.WatchStatusRequest()):
            pass
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_set_limit_changes_next_decision_and_is_audited(admin):
    comps, stub, _ = admin
    tgt = Target("openai", "cloud", "gpt-4o", 2_000_000)
    assert (await comps.budget.admit("a", tgt, None)).decision.action is Action.ALLOW
    r = await stub.SetLimit(pb.SetLimitRequest(name="global", limit_micros=1_000_000,
                                               hard_limit_action=pb.HARD_LIMIT_ACTION_BLOCK_ALL, actor="alice"),
                            metadata=AUTH)
    assert r.budget.limit_micros == 1_000_000 and r.budget.status == pb.STATUS_HARD_LIMIT
    assert (await comps.budget.admit("b", tgt, None)).decision.action is Action.REJECT
    audit = (await stub.ListAudit(pb.ListAuditRequest(limit=10), metadata=AUTH)).entries
    fields = {(a.field, a.old_value, a.new_value, a.actor) for a in audit}
    assert ("limit_micros", "10000000", "1000000", "alice") in fields
    assert ("hard_limit_action", "warn", "block_all", "alice") in fields


async def test_bad_arguments(admin):
    _, stub, _ = admin
    for req in (pb.SetLimitRequest(name="global", limit_micros=0),
                pb.SetLimitRequest(name="global", limit_micros=5, soft_limit_percent=150)):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.SetLimit(req, metadata=AUTH)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.GetStatus(pb.GetStatusRequest(name="nope"), metadata=AUTH)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


async def test_override_raises_then_reverts_by_itself(admin):
    comps, stub, clock = admin
    until = timestamp_pb2.Timestamp()
    until.FromDatetime(clock.t + timedelta(hours=2))
    r = await stub.SetOverride(pb.SetOverrideRequest(name="global", limit_micros=50_000_000, until=until),
                               metadata=AUTH)
    assert r.budget.limit_micros == 50_000_000 and r.budget.base_limit_micros == 10_000_000
    assert (await comps.budget.book.current_view()).limit_micros == 50_000_000
    clock.t += timedelta(hours=2, seconds=1)
    assert (await comps.budget.book.current_view()).limit_micros == 10_000_000
    st = (await stub.GetStatus(pb.GetStatusRequest(), metadata=AUTH)).budgets[0]
    assert st.limit_micros == 10_000_000 and not st.HasField("override_until")


async def test_watch_stream_sees_a_transition(admin):
    comps, stub, _ = admin
    call = stub.WatchStatus(pb.WatchStatusRequest(), metadata=AUTH)
    first = await asyncio.wait_for(call.read(), 5)
    assert first.budget.status == pb.STATUS_NORMAL
    await comps.budget.admit("big", Target("openai", "cloud", "gpt-4o", 9_000_000), None)  # 90 % → SoftLimit
    second = await asyncio.wait_for(call.read(), 5)
    assert second.budget.status == pb.STATUS_SOFT_LIMIT
    call.cancel()


async def test_list_spend_groups(admin):
    comps, stub, _ = admin
    from nexus_extproc.ledger import SpendRecord

    for i, model in enumerate(["gpt-4o", "gpt-4o", "claude-3-5-haiku"]):
        adm = await comps.budget.admit(f"s{i}", Target("openai", "cloud", model, 100), None)
        await comps.budget.settle(f"s{i}", adm, 100 + i, SpendRecord(1794312000.0 + i, model, "openai", 10, 5,
                                                                     100, "usage"))
    rows = (await stub.ListSpend(pb.ListSpendRequest(group_by=["model"]), metadata=AUTH)).rows
    assert {(r.model, r.requests, r.cost_micros) for r in rows} == {("gpt-4o", 2, 201), ("claude-3-5-haiku", 1, 102)}
    total = (await stub.ListSpend(pb.ListSpendRequest(), metadata=AUTH)).rows
    assert len(total) == 1 and total[0].cost_micros == 303 and total[0].input_tokens == 30


async def test_a_runtime_limit_says_where_it_comes_from_and_reset_gives_the_config_back(admin, counter, tmp_path,
                                                                                       caplog):
    comps, stub, _ = admin
    st = (await stub.GetStatus(pb.GetStatusRequest(), metadata=AUTH)).budgets[0]
    assert st.source == pb.SETTINGS_SOURCE_CONFIG and not st.set_by
    r = await stub.SetLimit(pb.SetLimitRequest(name="global", limit_micros=80_000_000, actor="alice"), metadata=AUTH)
    assert (r.budget.source, r.budget.set_by, r.budget.limit_micros) == (pb.SETTINGS_SOURCE_RUNTIME, "alice",
                                                                         80_000_000)
    assert r.budget.HasField("set_at")
    # Another replica (or a restart) on the same store sees the runtime setting, says so and warns once.
    other = build(make_config(budget={"monthly_limit_usd": 10}, store={"kind": "sqlite",
                                                                       "path": str(tmp_path / "l.db")}), counter)
    with caplog.at_level("WARNING", logger="nexus_extproc.budget"):
        await other.budget.load_settings()
        await other.budget.load_settings()
    warned = [rec for rec in caplog.records if "overrides the config" in rec.getMessage()]
    assert len(warned) == 1 and warned[0].limit_micros == "10000000 -> 80000000"  # type: ignore[attr-defined]
    assert other.budget.admin.provenance(other.budget.defs[0])["set_by"] == "alice"
    # reset-limit: the config applies again, here and (at its next reload) on the other replica; audited.
    r = await stub.ResetLimit(pb.ResetLimitRequest(name="global", actor="bob"), metadata=AUTH)
    assert (r.budget.source, r.budget.limit_micros) == (pb.SETTINGS_SOURCE_CONFIG, 10_000_000)
    await other.budget.load_settings()
    assert other.budget.defs[0].settings.limit_micros == 10_000_000
    assert other.budget.admin.provenance(other.budget.defs[0]) == {"source": "config"}
    audit = (await stub.ListAudit(pb.ListAuditRequest(limit=10), metadata=AUTH)).entries
    assert ("source", "runtime", "config", "bob") in {(a.field, a.old_value, a.new_value, a.actor) for a in audit}
    assert ("limit_micros", "80000000", "10000000", "bob") in {(a.field, a.old_value, a.new_value, a.actor)
                                                              for a in audit}
    await other.budget.ledger.close()


async def test_status_names_a_short_window_by_its_window(counter, tmp_path):
    comps = build(make_config(budgets=[{"name": "global", "limit_usd": 10},
                                       {"name": "burst", "period": {"rolling": "15m"}, "limit_usd": 1}],
                              store={"kind": "sqlite", "path": str(tmp_path / "w.db")}), counter)
    server, port = await start_admin_api(comps.budget.admin, "127.0.0.1", 0, TOKEN)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            got = await pb_grpc.BudgetAdminServiceStub(ch).GetStatus(pb.GetStatusRequest(), metadata=AUTH)
        periods = {b.name: b.period for b in got.budgets}
        assert periods["burst"] == "rolling 15m" and periods["global"] == datetime.now(UTC).strftime("%Y-%m")
    finally:
        await server.stop(0)


def test_the_api_scope_names_every_scope_field():
    """CreateBudget and the CLI's --scope read ScopeConfig's fields by name from BudgetScope: a scope field the
    config gains without the message (or the other way round) fails here, not at a caller's request."""
    from nexus_extproc.config import ScopeConfig

    assert {f.name for f in pb.BudgetScope.DESCRIPTOR.fields} == set(ScopeConfig.model_fields)
