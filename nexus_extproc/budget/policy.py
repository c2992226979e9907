"""The budget policy: a pure function from request facts and budget totals to a decision (SPEC §3).

No I/O and no clock here, so every status × action × equivalent combination is a plain table test. The
ledger makes the decision safe under concurrency: a decision that needs room reserves with a cap, and a
reservation that loses the race comes back here with `force_hard=True`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal

from nexus_extproc.terms import STATUS_CODE, BudgetStatus, HardAction

__all__ = ["REJECT_MODEL", "REJECT_RUNAWAY", "STATUS_CODE", "Action", "BudgetStatus", "BudgetView", "Decision",
           "HardAction", "PolicyInput", "Target", "decide", "reservation_cap", "strictest"]


class Action(enum.Enum):
    ALLOW = "allowed"
    REROUTE = "rerouted"
    REJECT = "rejected"


@dataclass(frozen=True, slots=True)
class Target:
    backend: str
    backend_type: Literal["cloud", "local"]
    model: str
    estimate_micros: int
    estimate_tokens: int = 0  # what a token budget reserves: the prompt's tokens plus the output expected

    def in_tokens(self) -> Target:
        """The same request as a token budget sees it: its estimate in tokens."""
        return Target(self.backend, self.backend_type, self.model, self.estimate_tokens, self.estimate_tokens)


@dataclass(frozen=True, slots=True)
class BudgetView:
    limit_micros: int
    settled_micros: int
    reserved_micros: int
    soft_limit_percent: Decimal
    hard_limit_action: HardAction
    unit: str = "usd"  # "tokens": the *_micros fields count tokens (a token budget's view)

    @property
    def used_micros(self) -> int:
        return self.settled_micros + self.reserved_micros

    def utilization(self, extra: int = 0) -> Decimal:
        return Decimal(self.used_micros + extra) * 100 / Decimal(self.limit_micros)

    def status(self, extra: int = 0) -> BudgetStatus:
        # Integer compares (the soft threshold in basis points): this runs per budget per request.
        used = self.used_micros + extra
        if used >= self.limit_micros:
            return "HardLimit"
        if used * 10_000 >= int(self.soft_limit_percent * 100) * self.limit_micros:
            return "SoftLimit"
        return "Normal"

    @property
    def utilization_ppm(self) -> int:
        """Utilization in parts per million, for ordering budgets without Decimal arithmetic."""
        return self.used_micros * 1_000_000 // max(self.limit_micros, 1)

    @property
    def remaining_micros(self) -> int:
        return max(0, self.limit_micros - self.used_micros)


@dataclass(frozen=True, slots=True)
class PolicyInput:
    requested: Target
    equivalent: Target | None  # a configured local equivalent, only if its backend is healthy
    budget: BudgetView | None


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    target: Target | None
    status: BudgetStatus
    # X-Nexus-Route-Reason of a reroute, or the refusal code of a rejection (REJECT_* below): a code, not
    # prose, so the wording lives once, where the request layer renders the client's error.
    reason: str | None = None


REJECT_CLOUD_BLOCKED = "cloud_blocked"  # block_cloud, and no healthy local equivalent
REJECT_EXHAUSTED = "budget_exhausted"  # block_all
REJECT_MODEL = "model_not_allowed"  # the model is not on a matching budget's `models` list
REJECT_RUNAWAY = "runaway"  # runaway detection throttles or blocks one of the request's values


def reservation_cap(action: HardAction, limit_micros: int, amount: int) -> int | None:
    """Where a reservation must be refused by the store: at the limit when the action blocks, so concurrent
    requests cannot each fit and together overshoot; nowhere for warn or for what costs nothing."""
    return None if action == "warn" or amount <= 0 else limit_micros


_ACTION_RANK = {Action.ALLOW: 0, Action.REROUTE: 1, Action.REJECT: 2}


def strictest(decisions: list[Decision], views: list[BudgetView]) -> int:
    """The budget that decides when a request falls under several: the harshest action, then the worst
    status, then the most utilised."""
    return max(range(len(decisions)), key=lambda k: (_ACTION_RANK[decisions[k].action],
                                                     STATUS_CODE[decisions[k].status], views[k].utilization_ppm))


def decide(inp: PolicyInput, *, force_hard: bool = False) -> Decision:
    b = inp.budget
    req = inp.requested
    if b is None:
        return Decision(Action.ALLOW, req, "Normal")
    status = b.status()
    action = b.hard_limit_action
    # A request that would carry spend past the limit is treated as at the limit when the action blocks:
    # otherwise concurrent requests each "fit" and together overshoot.
    crosses = b.used_micros + req.estimate_micros > b.limit_micros and req.estimate_micros > 0
    hard = force_hard or status == "HardLimit" or (crosses and action != "warn")
    eq = inp.equivalent

    if not hard:
        if status == "SoftLimit" and eq is not None and req.backend_type == "cloud":
            return Decision(Action.REROUTE, eq, status, "budget-soft-limit")
        return Decision(Action.ALLOW, req, status)

    shown: BudgetStatus = "HardLimit" if status == "HardLimit" or force_hard else status
    if action == "warn":
        if eq is not None and req.backend_type == "cloud":
            return Decision(Action.REROUTE, eq, shown, "budget-soft-limit")
        return Decision(Action.ALLOW, req, shown)
    if action == "block_cloud":
        if req.backend_type == "local":
            return Decision(Action.ALLOW, req, shown)
        if eq is not None:
            return Decision(Action.REROUTE, eq, shown, "budget-hard-limit")
        return Decision(Action.REJECT, None, shown, REJECT_CLOUD_BLOCKED)
    # block_all: every request, local models included (seed quickstart: "Block all agents → requests fail
    # with 503").
    return Decision(Action.REJECT, None, shown, REJECT_EXHAUSTED)
