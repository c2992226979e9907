import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STATUS_UNSPECIFIED: _ClassVar[Status]
    STATUS_NORMAL: _ClassVar[Status]
    STATUS_SOFT_LIMIT: _ClassVar[Status]
    STATUS_HARD_LIMIT: _ClassVar[Status]

class HardLimitAction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HARD_LIMIT_ACTION_UNSPECIFIED: _ClassVar[HardLimitAction]
    HARD_LIMIT_ACTION_WARN: _ClassVar[HardLimitAction]
    HARD_LIMIT_ACTION_BLOCK_CLOUD: _ClassVar[HardLimitAction]
    HARD_LIMIT_ACTION_BLOCK_ALL: _ClassVar[HardLimitAction]

class SettingsSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SETTINGS_SOURCE_UNSPECIFIED: _ClassVar[SettingsSource]
    SETTINGS_SOURCE_CONFIG: _ClassVar[SettingsSource]
    SETTINGS_SOURCE_RUNTIME: _ClassVar[SettingsSource]
STATUS_UNSPECIFIED: Status
STATUS_NORMAL: Status
STATUS_SOFT_LIMIT: Status
STATUS_HARD_LIMIT: Status
HARD_LIMIT_ACTION_UNSPECIFIED: HardLimitAction
HARD_LIMIT_ACTION_WARN: HardLimitAction
HARD_LIMIT_ACTION_BLOCK_CLOUD: HardLimitAction
HARD_LIMIT_ACTION_BLOCK_ALL: HardLimitAction
SETTINGS_SOURCE_UNSPECIFIED: SettingsSource
SETTINGS_SOURCE_CONFIG: SettingsSource
SETTINGS_SOURCE_RUNTIME: SettingsSource

class BudgetStatus(_message.Message):
    __slots__ = ("name", "period", "limit_micros", "base_limit_micros", "settled_micros", "reserved_micros", "utilization_percent", "status", "soft_limit_percent", "hard_limit_action", "override_until", "next_reset", "source", "set_by", "set_at")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PERIOD_FIELD_NUMBER: _ClassVar[int]
    LIMIT_MICROS_FIELD_NUMBER: _ClassVar[int]
    BASE_LIMIT_MICROS_FIELD_NUMBER: _ClassVar[int]
    SETTLED_MICROS_FIELD_NUMBER: _ClassVar[int]
    RESERVED_MICROS_FIELD_NUMBER: _ClassVar[int]
    UTILIZATION_PERCENT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    SOFT_LIMIT_PERCENT_FIELD_NUMBER: _ClassVar[int]
    HARD_LIMIT_ACTION_FIELD_NUMBER: _ClassVar[int]
    OVERRIDE_UNTIL_FIELD_NUMBER: _ClassVar[int]
    NEXT_RESET_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SET_BY_FIELD_NUMBER: _ClassVar[int]
    SET_AT_FIELD_NUMBER: _ClassVar[int]
    name: str
    period: str
    limit_micros: int
    base_limit_micros: int
    settled_micros: int
    reserved_micros: int
    utilization_percent: float
    status: Status
    soft_limit_percent: float
    hard_limit_action: HardLimitAction
    override_until: _timestamp_pb2.Timestamp
    next_reset: _timestamp_pb2.Timestamp
    source: SettingsSource
    set_by: str
    set_at: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., period: _Optional[str] = ..., limit_micros: _Optional[int] = ..., base_limit_micros: _Optional[int] = ..., settled_micros: _Optional[int] = ..., reserved_micros: _Optional[int] = ..., utilization_percent: _Optional[float] = ..., status: _Optional[_Union[Status, str]] = ..., soft_limit_percent: _Optional[float] = ..., hard_limit_action: _Optional[_Union[HardLimitAction, str]] = ..., override_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., next_reset: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., source: _Optional[_Union[SettingsSource, str]] = ..., set_by: _Optional[str] = ..., set_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("budgets",)
    BUDGETS_FIELD_NUMBER: _ClassVar[int]
    budgets: _containers.RepeatedCompositeFieldContainer[BudgetStatus]
    def __init__(self, budgets: _Optional[_Iterable[_Union[BudgetStatus, _Mapping]]] = ...) -> None: ...

class SetLimitRequest(_message.Message):
    __slots__ = ("name", "limit_micros", "soft_limit_percent", "hard_limit_action", "actor")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LIMIT_MICROS_FIELD_NUMBER: _ClassVar[int]
    SOFT_LIMIT_PERCENT_FIELD_NUMBER: _ClassVar[int]
    HARD_LIMIT_ACTION_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    limit_micros: int
    soft_limit_percent: float
    hard_limit_action: HardLimitAction
    actor: str
    def __init__(self, name: _Optional[str] = ..., limit_micros: _Optional[int] = ..., soft_limit_percent: _Optional[float] = ..., hard_limit_action: _Optional[_Union[HardLimitAction, str]] = ..., actor: _Optional[str] = ...) -> None: ...

class SetLimitResponse(_message.Message):
    __slots__ = ("budget",)
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    budget: BudgetStatus
    def __init__(self, budget: _Optional[_Union[BudgetStatus, _Mapping]] = ...) -> None: ...

class ResetLimitRequest(_message.Message):
    __slots__ = ("name", "actor")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    actor: str
    def __init__(self, name: _Optional[str] = ..., actor: _Optional[str] = ...) -> None: ...

class ResetLimitResponse(_message.Message):
    __slots__ = ("budget",)
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    budget: BudgetStatus
    def __init__(self, budget: _Optional[_Union[BudgetStatus, _Mapping]] = ...) -> None: ...

class SetOverrideRequest(_message.Message):
    __slots__ = ("name", "limit_micros", "until", "actor")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LIMIT_MICROS_FIELD_NUMBER: _ClassVar[int]
    UNTIL_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    limit_micros: int
    until: _timestamp_pb2.Timestamp
    actor: str
    def __init__(self, name: _Optional[str] = ..., limit_micros: _Optional[int] = ..., until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., actor: _Optional[str] = ...) -> None: ...

class SetOverrideResponse(_message.Message):
    __slots__ = ("budget",)
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    budget: BudgetStatus
    def __init__(self, budget: _Optional[_Union[BudgetStatus, _Mapping]] = ...) -> None: ...

class ListSpendRequest(_message.Message):
    __slots__ = ("to", "group_by")
    FROM_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    GROUP_BY_FIELD_NUMBER: _ClassVar[int]
    to: _timestamp_pb2.Timestamp
    group_by: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, to: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., group_by: _Optional[_Iterable[str]] = ..., **kwargs) -> None: ...

class SpendRow(_message.Message):
    __slots__ = ("budget", "model", "day", "requests", "input_tokens", "output_tokens", "cost_micros", "estimate_micros", "avoided_micros", "reaped_micros")
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DAY_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COST_MICROS_FIELD_NUMBER: _ClassVar[int]
    ESTIMATE_MICROS_FIELD_NUMBER: _ClassVar[int]
    AVOIDED_MICROS_FIELD_NUMBER: _ClassVar[int]
    REAPED_MICROS_FIELD_NUMBER: _ClassVar[int]
    budget: str
    model: str
    day: str
    requests: int
    input_tokens: int
    output_tokens: int
    cost_micros: int
    estimate_micros: int
    avoided_micros: int
    reaped_micros: int
    def __init__(self, budget: _Optional[str] = ..., model: _Optional[str] = ..., day: _Optional[str] = ..., requests: _Optional[int] = ..., input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., cost_micros: _Optional[int] = ..., estimate_micros: _Optional[int] = ..., avoided_micros: _Optional[int] = ..., reaped_micros: _Optional[int] = ...) -> None: ...

class ListSpendResponse(_message.Message):
    __slots__ = ("rows",)
    ROWS_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[SpendRow]
    def __init__(self, rows: _Optional[_Iterable[_Union[SpendRow, _Mapping]]] = ...) -> None: ...

class AuditEntry(_message.Message):
    __slots__ = ("time", "actor", "budget", "field", "old_value", "new_value")
    TIME_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    OLD_VALUE_FIELD_NUMBER: _ClassVar[int]
    NEW_VALUE_FIELD_NUMBER: _ClassVar[int]
    time: _timestamp_pb2.Timestamp
    actor: str
    budget: str
    field: str
    old_value: str
    new_value: str
    def __init__(self, time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., actor: _Optional[str] = ..., budget: _Optional[str] = ..., field: _Optional[str] = ..., old_value: _Optional[str] = ..., new_value: _Optional[str] = ...) -> None: ...

class ListAuditRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class ListAuditResponse(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[AuditEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[AuditEntry, _Mapping]]] = ...) -> None: ...

class WatchStatusRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class WatchStatusResponse(_message.Message):
    __slots__ = ("budget",)
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    budget: BudgetStatus
    def __init__(self, budget: _Optional[_Union[BudgetStatus, _Mapping]] = ...) -> None: ...
