"""The budget vocabulary (terms.py) as the admin API's protobuf enums, both ways."""

from nexus_extproc.api import budget_admin_pb2 as pb
from nexus_extproc.terms import BudgetStatus, HardAction

STATUS_TO_PB: dict[BudgetStatus, pb.Status] = {"Normal": pb.STATUS_NORMAL, "SoftLimit": pb.STATUS_SOFT_LIMIT,
                                         "HardLimit": pb.STATUS_HARD_LIMIT}
STATUS_FROM_PB: dict[int, BudgetStatus] = {v: k for k, v in STATUS_TO_PB.items()}
ACTION_TO_PB: dict[HardAction, pb.HardLimitAction] = {"warn": pb.HARD_LIMIT_ACTION_WARN,
                                       "block_cloud": pb.HARD_LIMIT_ACTION_BLOCK_CLOUD,
                                       "block_all": pb.HARD_LIMIT_ACTION_BLOCK_ALL}
ACTION_FROM_PB: dict[int, HardAction] = {v: k for k, v in ACTION_TO_PB.items()}
