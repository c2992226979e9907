"""The budget vocabulary, once: hard-limit actions and statuses, as config, policy, metrics and the admin API
spell them (SPEC §3). The protobuf enum mapping is the edge's (edge/pb_terms.py)."""

from typing import Literal

HardAction = Literal["warn", "block_cloud", "block_all"]
HARD_ACTIONS: tuple[HardAction, ...] = ("warn", "block_cloud", "block_all")

BudgetStatus = Literal["Normal", "SoftLimit", "HardLimit"]
STATUSES: tuple[BudgetStatus, ...] = ("Normal", "SoftLimit", "HardLimit")
STATUS_CODE: dict[BudgetStatus, int] = {s: i for i, s in enumerate(STATUSES)}  # the nexus_budget_status gauge
