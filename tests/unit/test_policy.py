from decimal import Decimal

import pytest

from nexus_extproc.budget.policy import (
    REJECT_CLOUD_BLOCKED,
    REJECT_EXHAUSTED,
    Action,
    BudgetView,
    PolicyInput,
    Target,
    decide,
    reservation_cap,
    strictest,
)

CLOUD = Target("openai", "cloud", "gpt-4o-mini", 1_000)
LOCAL_FREE = Target("ollama", "local", "llama3.1:8b", 0)
LOCAL_PAID = Target("ollama", "local", "llama3.1:8b", 10)


def view(used_pct: float, action: str) -> BudgetView:
    limit = 1_000_000
    return BudgetView(limit, int(limit * used_pct / 100), 0, Decimal(80), action)  # type: ignore[arg-type]


# (utilization %, action, equivalent) -> (action, target backend, status, reason)
TABLE = [
    (10, "warn", LOCAL_FREE, Action.ALLOW, "openai", "Normal", None),
    (10, "block_all", None, Action.ALLOW, "openai", "Normal", None),
    (85, "warn", LOCAL_FREE, Action.REROUTE, "ollama", "SoftLimit", "budget-soft-limit"),
    (85, "warn", None, Action.ALLOW, "openai", "SoftLimit", None),
    (85, "block_cloud", LOCAL_FREE, Action.REROUTE, "ollama", "SoftLimit", "budget-soft-limit"),
    (85, "block_cloud", None, Action.ALLOW, "openai", "SoftLimit", None),
    (100, "warn", None, Action.ALLOW, "openai", "HardLimit", None),
    (100, "warn", LOCAL_FREE, Action.REROUTE, "ollama", "HardLimit", "budget-soft-limit"),
    (100, "block_cloud", LOCAL_FREE, Action.REROUTE, "ollama", "HardLimit", "budget-hard-limit"),
    (100, "block_cloud", None, Action.REJECT, None, "HardLimit", None),
    (120, "block_all", LOCAL_FREE, Action.REJECT, None, "HardLimit", None),
    (120, "block_all", LOCAL_PAID, Action.REJECT, None, "HardLimit", None),
    (120, "block_all", None, Action.REJECT, None, "HardLimit", None),
]


@pytest.mark.parametrize(("pct", "action", "eq", "want", "backend", "status", "reason"), TABLE)
def test_policy_table(pct, action, eq, want, backend, status, reason):
    d = decide(PolicyInput(CLOUD, eq, view(pct, action)))
    assert d.action is want and d.status == status
    assert (d.target.backend if d.target else None) == backend
    if want is not Action.REJECT:
        assert d.reason == reason
    else:
        assert d.reason == (REJECT_CLOUD_BLOCKED if action == "block_cloud" else REJECT_EXHAUSTED)


LOCAL_REQ = Target("ollama", "local", "llama3.1:8b", 0)
# The seed's actions over every kind of request and status, written out row by row:
# (action, status %, request kind) -> (action, backend, reason). A kind is a requested target and its equivalent.
KINDS = {"cloud+eq": (CLOUD, LOCAL_FREE), "cloud": (CLOUD, None), "local": (LOCAL_REQ, None)}
ACTIONS = ("warn", "block_cloud", "block_all")
SEED = {
    **{(a, 10, k): (Action.ALLOW, "ollama" if k == "local" else "openai", None)
       for a in ACTIONS for k in KINDS},
    **{(a, 85, "cloud+eq"): (Action.REROUTE, "ollama", "budget-soft-limit") for a in ACTIONS},
    **{(a, 85, "cloud"): (Action.ALLOW, "openai", None) for a in ACTIONS},
    **{(a, 85, "local"): (Action.ALLOW, "ollama", None) for a in ACTIONS},
    ("warn", 100, "cloud+eq"): (Action.REROUTE, "ollama", "budget-soft-limit"),  # soft-limit reroutes still apply
    ("warn", 100, "cloud"): (Action.ALLOW, "openai", None),
    ("warn", 100, "local"): (Action.ALLOW, "ollama", None),
    ("block_cloud", 100, "cloud+eq"): (Action.REROUTE, "ollama", "budget-hard-limit"),
    ("block_cloud", 100, "cloud"): (Action.REJECT, None, REJECT_CLOUD_BLOCKED),
    ("block_cloud", 100, "local"): (Action.ALLOW, "ollama", None),
    ("block_all", 100, "cloud+eq"): (Action.REJECT, None, REJECT_EXHAUSTED),
    ("block_all", 100, "cloud"): (Action.REJECT, None, REJECT_EXHAUSTED),
    ("block_all", 100, "local"): (Action.REJECT, None, REJECT_EXHAUSTED),
}


@pytest.mark.parametrize(("action", "pct", "kind"), sorted(SEED))
def test_actions_as_the_seed_says(action, pct, kind):
    requested, eq = KINDS[kind]
    d = decide(PolicyInput(requested, eq, view(pct, action)))
    want, backend, reason = SEED[(action, pct, kind)]
    assert (d.action, d.target.backend if d.target else None, d.reason) == (want, backend, reason)
    assert d.status == {10: "Normal", 85: "SoftLimit", 100: "HardLimit"}[pct]


def test_a_refusal_is_worded_once_where_it_is_rendered():
    from nexus_extproc.apis.errors import budget_exceeded, render_error

    at = "2026-12-01T00:00:00Z"
    e = budget_exceeded(REJECT_CLOUD_BLOCKED, "team-ml", 30, at, 60)
    assert (e.status, e.message, e.headers) == (503, "cloud backends are blocked: budget 'team-ml' exhausted",
                                                {"retry-after": "30", "x-nexus-budget-reset": at})
    assert budget_exceeded(REJECT_EXHAUSTED, None, 0, at, 60).message == "monthly budget exhausted"
    assert b'"type":"error"' in render_error("anthropic", e) and b'"reset_at":"2026-12-01T00:00:00Z"' in render_error(
        "openai", e)


def test_a_refusal_never_asks_for_a_sleep_past_the_cap():
    """Issue 26: a month's reset as Retry-After made the Anthropic SDK and Codex sleep ~24 days."""
    from nexus_extproc.apis.errors import budget_exceeded

    at = "2026-12-31T00:00:00Z"
    long = budget_exceeded(REJECT_EXHAUSTED, None, 2_123_190, at, 60)
    assert "retry-after" not in long.headers and long.headers["x-should-retry"] == "false"
    assert long.headers["x-nexus-budget-reset"] == at
    assert budget_exceeded(REJECT_EXHAUSTED, None, 60, at, 60).headers["retry-after"] == "60"
    assert "retry-after" not in budget_exceeded(REJECT_EXHAUSTED, None, 5, at, 0).headers


def test_no_budget_always_allows_without_reservation_cap():
    d = decide(PolicyInput(CLOUD, LOCAL_FREE, None))
    assert d.action is Action.ALLOW and d.status == "Normal" and d.target == CLOUD


def test_request_that_would_cross_limit_is_treated_as_hard_under_blocking_actions():
    v = BudgetView(1_000_000, 999_500, 0, Decimal(80), "block_cloud")
    assert decide(PolicyInput(CLOUD, None, v)).action is Action.REJECT
    v = BudgetView(1_000_000, 999_500, 0, Decimal(80), "warn")
    assert decide(PolicyInput(CLOUD, None, v)).action is Action.ALLOW


def test_blocking_actions_cap_the_reservation_and_force_hard_rejects():
    assert reservation_cap("block_all", 1_000_000, 5) == 1_000_000
    assert reservation_cap("block_cloud", 1_000_000, 5) == 1_000_000
    assert reservation_cap("warn", 1_000_000, 5) is None
    assert reservation_cap("block_all", 1_000_000, 0) is None  # what costs nothing never needs room
    v = view(10, "block_all")
    assert decide(PolicyInput(CLOUD, None, v)).action is Action.ALLOW
    assert decide(PolicyInput(CLOUD, None, v), force_hard=True).action is Action.REJECT


def test_strictest_budget_decides():
    views = [view(10, "warn"), view(90, "block_cloud"), view(95, "warn")]
    decisions = [decide(PolicyInput(CLOUD, LOCAL_FREE, v)) for v in views]
    assert [d.action for d in decisions] == [Action.ALLOW, Action.REROUTE, Action.REROUTE]
    assert strictest(decisions, views) == 2  # same action and status: the most utilised
    views[0] = view(10, "block_cloud")  # the least utilised, but its capped reservation lost the race
    decisions[0] = decide(PolicyInput(CLOUD, LOCAL_FREE, views[0]), force_hard=True)
    assert decisions[0].action is Action.REROUTE and decisions[0].status == "HardLimit"
    assert strictest(decisions, views) == 0


def test_utilization_is_exact_decimal():
    v = BudgetView(3, 1, 0, Decimal(80), "warn")
    assert v.utilization() == Decimal(100) / 3
