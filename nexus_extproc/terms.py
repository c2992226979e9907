"""The budget vocabulary, once: hard-limit actions and statuses, as config, policy, metrics and the admin API
spell them (SPEC §3). The protobuf enum mapping is the edge's (edge/pb_terms.py)."""

from typing import Literal

HardAction = Literal["warn", "block_cloud", "block_all"]
HARD_ACTIONS: tuple[HardAction, ...] = ("warn", "block_cloud", "block_all")

BudgetStatus = Literal["Normal", "SoftLimit", "HardLimit"]
STATUSES: tuple[BudgetStatus, ...] = ("Normal", "SoftLimit", "HardLimit")
STATUS_CODE: dict[BudgetStatus, int] = {s: i for i, s in enumerate(STATUSES)}  # the nexus_budget_status gauge

_DURATION_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_s(text: str) -> int:
    """`30s`, `15m`, `1h`, `7d`: whole seconds, minutes, hours or days (windows take whole minutes, so that a
    rolling window's twelve buckets divide it exactly)."""
    t = text.strip()
    if len(t) < 2 or t[-1] not in _DURATION_UNIT_S or not t[:-1].isdigit() or len(t) > 7 or t[0] == "0":
        raise ValueError(f"a duration is a whole number of seconds, minutes, hours or days (30s, 15m, 1h, 7d), "
                         f"not {text!r}")
    return int(t[:-1]) * _DURATION_UNIT_S[t[-1]]
