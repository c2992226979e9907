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

class BudgetOrigin(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BUDGET_ORIGIN_UNSPECIFIED: _ClassVar[BudgetOrigin]
    BUDGET_ORIGIN_CONFIG: _ClassVar[BudgetOrigin]
    BUDGET_ORIGIN_RUNTIME: _ClassVar[BudgetOrigin]

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
BUDGET_ORIGIN_UNSPECIFIED: BudgetOrigin
BUDGET_ORIGIN_CONFIG: BudgetOrigin
BUDGET_ORIGIN_RUNTIME: BudgetOrigin
SETTINGS_SOURCE_UNSPECIFIED: SettingsSource
SETTINGS_SOURCE_CONFIG: SettingsSource
SETTINGS_SOURCE_RUNTIME: SettingsSource

class BudgetStatus(_message.Message):
    __slots__ = ("name", "period", "limit_micros", "base_limit_micros", "settled_micros", "reserved_micros", "utilization_percent", "status", "soft_limit_percent", "hard_limit_action", "override_until", "next_reset", "source", "set_by", "set_at", "active", "origin", "distinct_by", "instances", "forecast")
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
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    DISTINCT_BY_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    FORECAST_FIELD_NUMBER: _ClassVar[int]
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
    active: bool
    origin: BudgetOrigin
    distinct_by: _containers.RepeatedScalarFieldContainer[str]
    instances: int
    forecast: BudgetForecast
    def __init__(self, name: _Optional[str] = ..., period: _Optional[str] = ..., limit_micros: _Optional[int] = ..., base_limit_micros: _Optional[int] = ..., settled_micros: _Optional[int] = ..., reserved_micros: _Optional[int] = ..., utilization_percent: _Optional[float] = ..., status: _Optional[_Union[Status, str]] = ..., soft_limit_percent: _Optional[float] = ..., hard_limit_action: _Optional[_Union[HardLimitAction, str]] = ..., override_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., next_reset: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., source: _Optional[_Union[SettingsSource, str]] = ..., set_by: _Optional[str] = ..., set_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., active: _Optional[bool] = ..., origin: _Optional[_Union[BudgetOrigin, str]] = ..., distinct_by: _Optional[_Iterable[str]] = ..., instances: _Optional[int] = ..., forecast: _Optional[_Union[BudgetForecast, _Mapping]] = ...) -> None: ...

class Projection(_message.Message):
    __slots__ = ("days", "point_micros", "low_micros", "high_micros")
    DAYS_FIELD_NUMBER: _ClassVar[int]
    POINT_MICROS_FIELD_NUMBER: _ClassVar[int]
    LOW_MICROS_FIELD_NUMBER: _ClassVar[int]
    HIGH_MICROS_FIELD_NUMBER: _ClassVar[int]
    days: float
    point_micros: int
    low_micros: int
    high_micros: int
    def __init__(self, days: _Optional[float] = ..., point_micros: _Optional[int] = ..., low_micros: _Optional[int] = ..., high_micros: _Optional[int] = ...) -> None: ...

class BudgetForecast(_message.Message):
    __slots__ = ("trend", "history_days", "horizons", "end_of_period", "overrun_likely")
    TREND_FIELD_NUMBER: _ClassVar[int]
    HISTORY_DAYS_FIELD_NUMBER: _ClassVar[int]
    HORIZONS_FIELD_NUMBER: _ClassVar[int]
    END_OF_PERIOD_FIELD_NUMBER: _ClassVar[int]
    OVERRUN_LIKELY_FIELD_NUMBER: _ClassVar[int]
    trend: str
    history_days: int
    horizons: _containers.RepeatedCompositeFieldContainer[Projection]
    end_of_period: Projection
    overrun_likely: bool
    def __init__(self, trend: _Optional[str] = ..., history_days: _Optional[int] = ..., horizons: _Optional[_Iterable[_Union[Projection, _Mapping]]] = ..., end_of_period: _Optional[_Union[Projection, _Mapping]] = ..., overrun_likely: _Optional[bool] = ...) -> None: ...

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
    __slots__ = ("budget", "model", "day", "requests", "input_tokens", "output_tokens", "cost_micros", "estimate_micros", "avoided_micros", "reaped_micros", "week", "month", "backend", "task", "tag", "team")
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
    WEEK_FIELD_NUMBER: _ClassVar[int]
    MONTH_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    TEAM_FIELD_NUMBER: _ClassVar[int]
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
    week: str
    month: str
    backend: str
    task: str
    tag: str
    team: str
    def __init__(self, budget: _Optional[str] = ..., model: _Optional[str] = ..., day: _Optional[str] = ..., requests: _Optional[int] = ..., input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., cost_micros: _Optional[int] = ..., estimate_micros: _Optional[int] = ..., avoided_micros: _Optional[int] = ..., reaped_micros: _Optional[int] = ..., week: _Optional[str] = ..., month: _Optional[str] = ..., backend: _Optional[str] = ..., task: _Optional[str] = ..., tag: _Optional[str] = ..., team: _Optional[str] = ...) -> None: ...

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

class BudgetScope(_message.Message):
    __slots__ = ("user", "team", "agent", "model", "backend_type", "api_key_hash", "tool", "session")
    USER_FIELD_NUMBER: _ClassVar[int]
    TEAM_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BACKEND_TYPE_FIELD_NUMBER: _ClassVar[int]
    API_KEY_HASH_FIELD_NUMBER: _ClassVar[int]
    TOOL_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    user: str
    team: str
    agent: str
    model: str
    backend_type: str
    api_key_hash: str
    tool: str
    session: str
    def __init__(self, user: _Optional[str] = ..., team: _Optional[str] = ..., agent: _Optional[str] = ..., model: _Optional[str] = ..., backend_type: _Optional[str] = ..., api_key_hash: _Optional[str] = ..., tool: _Optional[str] = ..., session: _Optional[str] = ...) -> None: ...

class CreateBudgetRequest(_message.Message):
    __slots__ = ("name", "scope", "period", "timezone", "limit_micros", "soft_limit_percent", "hard_limit_action", "alert_thresholds", "max_instances", "inactive", "actor", "limit_tokens", "models")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    PERIOD_FIELD_NUMBER: _ClassVar[int]
    TIMEZONE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_MICROS_FIELD_NUMBER: _ClassVar[int]
    SOFT_LIMIT_PERCENT_FIELD_NUMBER: _ClassVar[int]
    HARD_LIMIT_ACTION_FIELD_NUMBER: _ClassVar[int]
    ALERT_THRESHOLDS_FIELD_NUMBER: _ClassVar[int]
    MAX_INSTANCES_FIELD_NUMBER: _ClassVar[int]
    INACTIVE_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    LIMIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    name: str
    scope: BudgetScope
    period: str
    timezone: str
    limit_micros: int
    soft_limit_percent: float
    hard_limit_action: HardLimitAction
    alert_thresholds: _containers.RepeatedScalarFieldContainer[float]
    max_instances: int
    inactive: bool
    actor: str
    limit_tokens: int
    models: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., scope: _Optional[_Union[BudgetScope, _Mapping]] = ..., period: _Optional[str] = ..., timezone: _Optional[str] = ..., limit_micros: _Optional[int] = ..., soft_limit_percent: _Optional[float] = ..., hard_limit_action: _Optional[_Union[HardLimitAction, str]] = ..., alert_thresholds: _Optional[_Iterable[float]] = ..., max_instances: _Optional[int] = ..., inactive: _Optional[bool] = ..., actor: _Optional[str] = ..., limit_tokens: _Optional[int] = ..., models: _Optional[_Iterable[str]] = ...) -> None: ...

class CreateBudgetResponse(_message.Message):
    __slots__ = ("budget",)
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    budget: BudgetStatus
    def __init__(self, budget: _Optional[_Union[BudgetStatus, _Mapping]] = ...) -> None: ...

class DeleteBudgetRequest(_message.Message):
    __slots__ = ("name", "actor")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    actor: str
    def __init__(self, name: _Optional[str] = ..., actor: _Optional[str] = ...) -> None: ...

class DeleteBudgetResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SetActiveRequest(_message.Message):
    __slots__ = ("name", "active", "actor")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    active: bool
    actor: str
    def __init__(self, name: _Optional[str] = ..., active: _Optional[bool] = ..., actor: _Optional[str] = ...) -> None: ...

class SetActiveResponse(_message.Message):
    __slots__ = ("budget",)
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    budget: BudgetStatus
    def __init__(self, budget: _Optional[_Union[BudgetStatus, _Mapping]] = ...) -> None: ...

class GetForecastRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetForecastResponse(_message.Message):
    __slots__ = ("name", "forecast")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FORECAST_FIELD_NUMBER: _ClassVar[int]
    name: str
    forecast: BudgetForecast
    def __init__(self, name: _Optional[str] = ..., forecast: _Optional[_Union[BudgetForecast, _Mapping]] = ...) -> None: ...

class Alert(_message.Message):
    __slots__ = ("id", "time", "budget", "period", "threshold", "spend_micros", "limit_micros", "delivery", "attempts", "acked_by", "acked_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    PERIOD_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    SPEND_MICROS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_MICROS_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    ACKED_BY_FIELD_NUMBER: _ClassVar[int]
    ACKED_AT_FIELD_NUMBER: _ClassVar[int]
    id: int
    time: _timestamp_pb2.Timestamp
    budget: str
    period: str
    threshold: str
    spend_micros: int
    limit_micros: int
    delivery: str
    attempts: int
    acked_by: str
    acked_at: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., budget: _Optional[str] = ..., period: _Optional[str] = ..., threshold: _Optional[str] = ..., spend_micros: _Optional[int] = ..., limit_micros: _Optional[int] = ..., delivery: _Optional[str] = ..., attempts: _Optional[int] = ..., acked_by: _Optional[str] = ..., acked_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListAlertsRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class ListAlertsResponse(_message.Message):
    __slots__ = ("alerts",)
    ALERTS_FIELD_NUMBER: _ClassVar[int]
    alerts: _containers.RepeatedCompositeFieldContainer[Alert]
    def __init__(self, alerts: _Optional[_Iterable[_Union[Alert, _Mapping]]] = ...) -> None: ...

class AckAlertRequest(_message.Message):
    __slots__ = ("id", "actor")
    ID_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    id: int
    actor: str
    def __init__(self, id: _Optional[int] = ..., actor: _Optional[str] = ...) -> None: ...

class AckAlertResponse(_message.Message):
    __slots__ = ("alert",)
    ALERT_FIELD_NUMBER: _ClassVar[int]
    alert: Alert
    def __init__(self, alert: _Optional[_Union[Alert, _Mapping]] = ...) -> None: ...

class Recommendation(_message.Message):
    __slots__ = ("kind", "subject", "summary", "potential_saving_micros", "data_json")
    KIND_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    POTENTIAL_SAVING_MICROS_FIELD_NUMBER: _ClassVar[int]
    DATA_JSON_FIELD_NUMBER: _ClassVar[int]
    kind: str
    subject: str
    summary: str
    potential_saving_micros: int
    data_json: str
    def __init__(self, kind: _Optional[str] = ..., subject: _Optional[str] = ..., summary: _Optional[str] = ..., potential_saving_micros: _Optional[int] = ..., data_json: _Optional[str] = ...) -> None: ...

class ListRecommendationsRequest(_message.Message):
    __slots__ = ("to",)
    FROM_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    to: _timestamp_pb2.Timestamp
    def __init__(self, to: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., **kwargs) -> None: ...

class ListRecommendationsResponse(_message.Message):
    __slots__ = ("recommendations",)
    RECOMMENDATIONS_FIELD_NUMBER: _ClassVar[int]
    recommendations: _containers.RepeatedCompositeFieldContainer[Recommendation]
    def __init__(self, recommendations: _Optional[_Iterable[_Union[Recommendation, _Mapping]]] = ...) -> None: ...

class ExportSpendRequest(_message.Message):
    __slots__ = ("to", "format", "group_by")
    FROM_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    GROUP_BY_FIELD_NUMBER: _ClassVar[int]
    to: _timestamp_pb2.Timestamp
    format: str
    group_by: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, to: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., format: _Optional[str] = ..., group_by: _Optional[_Iterable[str]] = ..., **kwargs) -> None: ...

class ExportSpendResponse(_message.Message):
    __slots__ = ("content_type", "data")
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    content_type: str
    data: bytes
    def __init__(self, content_type: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...
