"""Configuration: one YAML file validated at start-up, then `NEXUS_…` environment overrides.

A bad file must stop the server with the offending key named: a budget service that starts on a
half-understood config enforces the wrong limits silently.
"""

from __future__ import annotations

import fnmatch
import os
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from nexus_extproc.terms import HardAction, duration_s

ENV_PREFIX = "NEXUS_"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BudgetConfig(_Strict):
    monthly_limit_usd: Decimal = Field(gt=0)
    soft_limit_percent: Decimal = Field(default=Decimal(80), gt=0, le=100)
    hard_limit_action: HardAction = "warn"
    reconciliation_interval_secs: int = Field(default=60, ge=1)
    always_send_status_headers: bool = False


BUDGET_NAME = r"^[a-z0-9][a-z0-9_.-]{0,62}$"


class ScopeConfig(_Strict):
    """Which requests a budget counts: every field given must match (an empty scope matches everything).
    "*" for user, team, agent, tool or session: any value, and one budget per distinct value."""

    api_key_hash: str | None = Field(default=None, pattern=r"^hmac-sha256:[0-9a-f]{64}$")
    user: str | None = None
    team: str | None = None
    agent: str | None = None
    model: str | None = None  # glob, e.g. "gpt-4o*"
    backend_type: Literal["cloud", "local"] | None = None
    # The client's tool (request/client_tool.py labels: claude-code, codex, openai-python, ..., other) and its
    # own session id (hashed). Both are what the client says, not an identity: a session budget bounds a
    # runaway agent, not a client that rotates its session id on purpose (pair it with a key or team budget).
    tool: str | None = None
    session: str | None = None


def _timezone(v: str) -> str:
    try:
        ZoneInfo(v)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown timezone {v!r}") from None
    return v


class ReportScheduleConfig(_Strict):
    """A report of the budget's spend, made once per `every` across all replicas, at `schedule` (HH:MM) on the
    clock of `timezone`, for the window that just ended (yesterday, last week, last month)."""

    schedule: str = Field(default="01:00", pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$")
    timezone: str = "UTC"
    every: Literal["daily", "weekly", "monthly"] = "daily"
    # A directory (written as <budget>-<window>.<ext>), an http(s) URL (POSTed as JSON), or
    # `mailto:a@example.com,b@example.com` (mailed through alerts.email, the report as the message's text).
    to: str = Field(min_length=1)
    format: Literal["json", "csv", "focus"] = "json"

    _tz = field_validator("timezone")(classmethod(lambda cls, v: _timezone(v)))


def _minutes(v: str, most_s: int, what: str) -> str:
    """A window's length: whole minutes (a rolling window's twelve buckets divide it), 1m to `most_s`."""
    s = duration_s(v)
    if not 60 <= s <= most_s or s % 60:
        raise ValueError(f"{what} is whole minutes, 1m to {most_s // 86400}d")
    return v


class RollingPeriodConfig(_Strict):
    """The spend of the last `rolling` (15m, 1h, 24h, 7d; up to 31 days): refused with 429 at the limit."""

    rolling: str

    _window = field_validator("rolling")(classmethod(lambda cls, v: _minutes(v, 31 * 86400, "a rolling window")))


class EveryPeriodConfig(_Strict):
    """A short fixed window (`every: 10m`), aligned to the Unix epoch: refused with 429 at the limit."""

    every: str

    _window = field_validator("every")(classmethod(lambda cls, v: _minutes(v, 86400, "an `every` window")))


class BudgetDefConfig(_Strict):
    name: str = Field(pattern=BUDGET_NAME)
    scope: Literal["global"] | ScopeConfig = "global"
    period: Literal["daily", "weekly", "monthly", "hourly"] | RollingPeriodConfig | EveryPeriodConfig = "monthly"
    timezone: str = "UTC"
    limit_usd: Decimal | None = Field(default=None, gt=0)
    # Tokens (input + output) instead of, or beside, dollars: with both, `<name>.tokens` is a second budget on
    # the same scope and period, and a request must fit both.
    limit_tokens: int | None = Field(default=None, gt=0)
    soft_limit_percent: Decimal = Field(default=Decimal(80), gt=0, le=100)
    hard_limit_action: HardAction = "warn"
    alert_thresholds: list[Decimal] = Field(default_factory=lambda: [Decimal(80), Decimal(90), Decimal(100)])
    # With "*" in the scope (team: "*"): at most this many distinct values get their own budget per period;
    # the requests of any further value share one overflow budget, `<name>/_other` (docs/budgets.md).
    max_instances: int = Field(default=10_000, ge=1, le=1_000_000)
    # Inactive: tracked (reserved, settled, reported) but never enforced.
    active: bool = True
    reports: ReportScheduleConfig | None = None
    # Models the budget's requests may ask for (globs); another is refused with 403 naming these.
    models: list[str] | None = Field(default=None, min_length=1)
    alert_emails: list[str] = Field(default_factory=list)  # this budget's alerts also go to these addresses
    # A distinct-value instance (session: "*", ...) unused this long stops counting toward `max_instances` and
    # leaves the instance index; its spend stays in its period. Default: 1h for session scopes, never otherwise.
    idle_ttl: str | None = None

    @model_validator(mode="after")
    def _a_limit(self) -> BudgetDefConfig:
        if self.limit_usd is None and self.limit_tokens is None:
            raise ValueError("a budget needs limit_usd, limit_tokens or both")
        return self

    @field_validator("idle_ttl")
    @classmethod
    def _ttl(cls, v: str | None) -> str | None:
        if v is not None:
            duration_s(v)
        return v

    _tz = field_validator("timezone")(classmethod(lambda cls, v: _timezone(v)))

    @field_validator("alert_thresholds")
    @classmethod
    def _thresholds(cls, v: list[Decimal]) -> list[Decimal]:
        if any(t <= 0 or t > 1000 for t in v):
            raise ValueError("thresholds are percentages in (0, 1000]")
        return sorted(set(v))


class IdentityConfig(_Strict):
    # x-nexus-user/-team/-agent are honoured for budget scopes only when an authenticator in front of this
    # filter (jwt_authn, ext_authz) sets them; otherwise a client could pick its own budget.
    trust_identity_headers: bool = False
    # x-nexus-task / x-nexus-tags are recorded on each settlement for reports; they never pick a budget, but
    # a client could still file its spend under another team's task, so they too need an authenticator (or a
    # route that sets them) in front.
    trust_attribution_headers: bool = False
    api_key_salt_env: str = "NEXUS_API_KEY_SALT"


class EmailConfig(_Strict):
    """Alert mail (seed 004): off until `smtp_host` is set. Recipients: `recipients`, plus the comma-separated
    $BUDGET_ALERT_EMAIL_RECIPIENTS, plus each budget's own `alert_emails`."""

    smtp_host: str | None = None
    smtp_port: int = Field(default=587, ge=1, le=65535)
    starttls: bool = True
    tls_ca_file: str | None = None  # a private CA to verify the server by (default: the system's)
    username: str | None = None
    password_env: str = "NEXUS_SMTP_PASSWORD"  # the password is read from this variable, never from the file
    sender: str = "nexus-extproc@localhost"
    recipients: list[str] = Field(default_factory=list)
    timeout_secs: float = Field(default=10.0, gt=0)


class AlertsConfig(_Strict):
    webhook_url: str | None = None
    timeout_secs: float = Field(default=2.0, gt=0)
    max_attempts: int = Field(default=5, ge=1, le=20)
    backoff_secs: float = Field(default=0.5, ge=0)
    email: EmailConfig = EmailConfig()


class StoreConfig(_Strict):
    kind: Literal["sqlite", "redis"] = "sqlite"
    path: str = "./nexus-ledger.db"
    url: str = "redis://127.0.0.1:6379/0"
    # Redis Cluster: `url` is any node's; every key takes the hash tag {key_prefix}, one slot (ledger/redis.py).
    cluster: bool = False
    key_prefix: str = Field(default="nexus", min_length=1, pattern=r"^[^{}\s]+$")
    timeout_ms: int = Field(default=250, ge=10)
    reservation_ttl_secs: int = Field(default=900, ge=5)
    outbox_path: str = "./nexus-outbox.jsonl"
    # SQLite's write-ahead log is truncated when it grows past this (and at once on a full disk).
    wal_max_bytes: int = Field(default=64 << 20, ge=1 << 20)


class BackendConfig(_Strict):
    cluster: str
    type: Literal["cloud", "local"]
    # The client API this backend speaks (SPEC §2.3 names it `provider`): which requests it may receive.
    provider: Literal["openai", "anthropic"]
    models: list[str] = Field(default_factory=list)
    default: bool = False
    # Whose prices it charges, as a genai-prices provider id, when that is not the API's owner: an
    # OpenAI-compatible backend at Azure, Groq or OpenRouter speaks `openai` but bills its own prices.
    price_provider: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9_.-]*$")

    @property
    def prices_from(self) -> str:
        return self.price_provider or self.provider

    def serves(self, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, pat) for pat in self.models)


class PriceOverride(_Strict):
    input_per_mtok: Decimal = Field(ge=0)
    output_per_mtok: Decimal = Field(ge=0)
    cache_read_per_mtok: Decimal | None = Field(default=None, ge=0)
    cache_write_per_mtok: Decimal | None = Field(default=None, ge=0)


def read_secret(path: str | None, env: str) -> str | None:
    """A secret from its file when one is named (unreadable or empty: none), else from the environment."""
    if path:
        try:
            return Path(path).read_text(encoding="utf-8").strip() or None
        except OSError:
            return None
    return os.environ.get(env) or None


class ServerConfig(_Strict):
    grpc_host: str = "127.0.0.1"
    grpc_port: int = Field(default=50051, ge=0, le=65535)
    # Also serve ext_proc on this Unix socket (worker i of several: PATH.i), for an Envoy on the same host
    # (`pipe` endpoints). TCP stays on for health checks and tools.
    uds_path: str | None = None
    admin_host: str = "127.0.0.1"
    admin_port: int = Field(default=9090, ge=0, le=65535)
    workers: int = Field(default=1, ge=1, le=64)
    # With workers > 1: a worker that has served this many streams (±10 %, so workers do not recycle together)
    # leaves gracefully and the parent starts a fresh one; 0 = never. It bounds native memory that grpc.aio
    # leaks on streams Envoy resets (grpc/grpc#43360). The worker first reports NOT_SERVING for
    # recycle_drain_secs, longer than Envoy's health check takes to notice (2 × 2 s), and keeps serving meanwhile.
    max_streams_per_worker: int = Field(default=0, ge=0)
    recycle_drain_secs: float = Field(default=6.0, ge=0)
    grace_period_secs: float = Field(default=20.0, ge=0)
    # Requests whose text exceeds this many bytes are tokenized in a worker thread (tiktoken releases the GIL)
    # so one huge prompt does not stall every other stream on the event loop.
    thread_tokenize_bytes: int = Field(default=32_768, ge=0)
    # The Anthropic Messages API's own limit (long context with images runs past 8 MiB); Envoy's buffer limit
    # (request_body_buffer_limit in envoy/nexus.yaml) is the same.
    max_request_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    # A refusal's Retry-After only when the budget frees up within this many seconds (0: never). The Anthropic
    # SDK and Codex sleep for whatever Retry-After says (a month's reset: ~24 days); past the cap the refusal
    # says `x-should-retry: false` instead, and the reset time is in X-Nexus-Budget-Reset and the body.
    retry_after_max_secs: int = Field(default=60, ge=0)
    # A path no API profile meters and no free endpoint names (apis/endpoints.py): `refuse` answers 404 in the
    # client's API shape; `pass` forwards it uncharged, counted in nexus_passthrough_requests_total{endpoint=
    # "unknown"}. The paths Claude Code and Codex use are all metered or free either way.
    unknown_paths: Literal["refuse", "pass"] = "refuse"
    # Own deadline for a stream: Envoy runs no timer in some modes, and a half-open stream must not hold a
    # reservation forever.
    stream_idle_timeout_secs: float = Field(default=300.0, gt=0)
    # Who reads a response's usage. `ext_proc`: the server, chunk by chunk (every Envoy, every mesh). `envoy`:
    # Envoy's filters (sse_to_metadata, json_to_metadata), reported to the server on the gRPC access-log stream; no
    # byte of the response reaches the server (docs/streaming.md). `auto`: per ext_proc stream, as its Envoy says
    # (gRPC initial metadata `x-nexus-settlement: envoy`, which the configs and assets that add those filters send),
    # so a server is right for either shape of Envoy and a change of the Envoy side needs nothing here.
    settlement: Literal["auto", "ext_proc", "envoy"] = "auto"
    # The usage chunk the server asks for when an OpenAI stream did not (`stream_options.include_usage`): `hidden`,
    # removed from what the client receives (by envoy/nexus.yaml's Lua filter where its Envoy says so, else by the
    # server on the ext_proc path), or
    # `visible`, passed through (they take Envoy's path too; clients ignore a chunk with empty `choices`).
    stream_usage: Literal["hidden", "visible"] = "hidden"
    # With settlement: envoy, a stream whose report has not come this long after its end settles at its estimate.
    envoy_report_wait_secs: float = Field(default=5.0, gt=0)
    # A shared secret Envoy sends on its ext_proc and access-log streams (gRPC initial metadata
    # `x-nexus-envoy-token`, EnvoyParams.envoy_token): with one set, a stream without it is refused
    # (UNAUTHENTICATED, nexus_unauthenticated_streams_total), so only Envoy may decide requests or report usage.
    envoy_token_file: str | None = None
    envoy_token_env: str = "NEXUS_ENVOY_TOKEN"

    def envoy_token(self) -> str | None:
        return read_secret(self.envoy_token_file, self.envoy_token_env)
    # Envoy's admin address: when set, local backends Envoy's health checks mark down are never reroute targets.
    envoy_admin_url: str | None = None
    health_poll_secs: float = Field(default=5.0, gt=0)
    event_loop: Literal["asyncio", "uvloop"] = "asyncio"
    log_json: bool = False
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class AdminApiConfig(_Strict):
    """The gRPC admin API (protos/nexus/budget/v1). Disabled unless a token is configured: budgets must never
    be changeable without authentication."""

    host: str = "127.0.0.1"
    port: int = Field(default=9091, ge=0, le=65535)
    token_file: str | None = None
    token_env: str = "NEXUS_ADMIN_TOKEN"
    # Per credential (the gRPC API, and /v1/* on the HTTP listener when a token is set): refused with
    # RESOURCE_EXHAUSTED (gRPC) or 429 (HTTP) past this rate. 0 turns it off.
    rate_limit_per_second: float = Field(default=20.0, ge=0)
    rate_limit_burst: int = Field(default=40, ge=1)

    def token(self) -> str | None:
        return read_secret(self.token_file, self.token_env)


class EstimationConfig(_Strict):
    default_output_tokens: int = Field(default=512, ge=0)
    # Anthropic and other non-OpenAI families are counted with cl100k and scaled by this factor.
    approximation_factor: Decimal = Field(default=Decimal("1.10"), gt=0)
    p95_window: int = Field(default=200, ge=10)
    # Learn provider-input ÷ our count per (model, tier, shape) from settlements (docs/budgets.md).
    calibration: bool = True
    calibration_half_life_hours: float = Field(default=168.0, gt=0)
    calibration_flush_secs: float = Field(default=2.0, gt=0, le=300)


RunawayDim = Literal["api_key", "session", "agent", "tool", "team", "user"]
RUNAWAY_DEFAULT_DIMS: tuple[RunawayDim, ...] = ("api_key", "session", "agent")


class RunawayConfig(_Strict):
    """Runaway detection (docs/budgets.md): per value of each `by` dimension, the spend of the last `window`
    against its own trailing `baseline` (as a rate) and against its peers' median; `factor` past either, and
    at least `min_spend_usd`, fires one alert, and `throttle` (429) or `block` (403) it for `cooldown`."""

    enabled: bool = False
    by: list[RunawayDim] = Field(default_factory=lambda: list(RUNAWAY_DEFAULT_DIMS), min_length=1)
    window: str = "5m"
    baseline: str = "1h"
    factor: Decimal = Field(default=Decimal(10), gt=1)
    min_spend_usd: Decimal = Field(default=Decimal("0.50"), ge=0)
    min_peers: int = Field(default=3, ge=1)
    action: Literal["alert", "throttle", "block"] = "alert"
    cooldown: str = "10m"

    @field_validator("window", "baseline", "cooldown")
    @classmethod
    def _durations(cls, v: str) -> str:
        duration_s(v)
        return v


class RetentionConfig(_Strict):
    """Pruned once a day across replicas (seed 004 keeps 30 days of alerts). Settlements are rolled up into daily
    aggregates first, so reports and forecasts over old periods still answer; 0 keeps them forever."""

    alerts_days: int = Field(default=30, ge=0)
    settlements_days: int = Field(default=400, ge=0)


class NexusConfig(_Strict):
    budget: BudgetConfig | None = None
    budgets: list[BudgetDefConfig] = Field(default_factory=list)
    identity: IdentityConfig = IdentityConfig()
    alerts: AlertsConfig = AlertsConfig()
    store: StoreConfig = StoreConfig()
    store_failure: Literal["closed", "open"] = "closed"
    backends: dict[str, BackendConfig]
    equivalents: dict[str, str] = Field(default_factory=dict)
    prices: dict[str, PriceOverride] = Field(default_factory=dict)
    unpriced_model_action: Literal["charge_fallback", "reject"] = "charge_fallback"
    fallback_price: PriceOverride = PriceOverride(input_per_mtok=Decimal(15), output_per_mtok=Decimal(75))
    estimation: EstimationConfig = EstimationConfig()
    server: ServerConfig = ServerConfig()
    admin_api: AdminApiConfig = AdminApiConfig()
    runaway: RunawayConfig = RunawayConfig()
    retention: RetentionConfig = RetentionConfig()

    @field_validator("backends")
    @classmethod
    def _non_empty(cls, v: dict[str, BackendConfig]) -> dict[str, BackendConfig]:
        if not v:
            raise ValueError("at least one backend is required")
        return v

    @model_validator(mode="after")
    def _equivalents_point_at_local_backends(self) -> NexusConfig:
        for src, target in self.equivalents.items():
            backend, sep, model = target.partition("/")
            if not sep or not model:
                raise ValueError(f"equivalents.{src}: expected 'backend/model', got {target!r}")
            if backend not in self.backends:
                raise ValueError(f"equivalents.{src}: unknown backend {backend!r}")
            if self.backends[backend].type != "local":
                raise ValueError(f"equivalents.{src}: backend {backend!r} is not local")
        return self

    @model_validator(mode="after")
    def _budget_names_unique(self) -> NexusConfig:
        names = [b.name for b in self.budget_defs()]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"budgets: duplicate name(s) {', '.join(dupes)} (the `budget:` block is named 'global')")
        return self

    def budget_defs(self) -> list[BudgetDefConfig]:
        """Every budget; the single `budget:` block is the global monthly budget named 'global'."""
        out = []
        if self.budget is not None:
            out.append(BudgetDefConfig(name="global", limit_usd=self.budget.monthly_limit_usd,
                                       soft_limit_percent=self.budget.soft_limit_percent,
                                       hard_limit_action=self.budget.hard_limit_action))
        for b in self.budgets:
            if b.limit_usd is not None and b.limit_tokens is not None:
                out += [b.model_copy(update={"limit_tokens": None}),
                        b.model_copy(update={"name": f"{b.name}.tokens", "limit_usd": None})]
            else:
                out.append(b)
        return out

    def configured_models(self) -> set[str]:
        """Every concrete model id the config names: each must have a price at start-up (SPEC §2.3)."""
        names = set(self.equivalents) | set(self.prices)
        names |= {t.partition("/")[2] for t in self.equivalents.values()}
        for b in self.backends.values():
            names |= {m for m in b.models if not any(ch in m for ch in "*?[")}
        return names


class ConfigError(Exception):
    """Carries a message naming the key; the CLI prints it and exits non-zero."""


def _apply_env(doc: dict[str, Any], environ: dict[str, str]) -> None:
    """`NEXUS_BUDGET__MONTHLY_LIMIT_USD=50` sets budget.monthly_limit_usd (values parsed as YAML scalars)."""
    for key, raw in sorted(environ.items()):
        if not key.startswith(ENV_PREFIX) or "__" not in key[len(ENV_PREFIX):]:
            continue
        path = [p.lower() for p in key[len(ENV_PREFIX):].split("__")]
        node: dict[str, Any] = doc
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = yaml.safe_load(raw)
    # The cost-control seed's own variable: more alert mail recipients, comma-separated.
    extra = [a.strip() for a in environ.get("BUDGET_ALERT_EMAIL_RECIPIENTS", "").split(",") if a.strip()]
    if extra:
        alerts = doc.setdefault("alerts", {})
        email = alerts.setdefault("email", {}) if isinstance(alerts, dict) else None
        if isinstance(email, dict):
            email["recipients"] = [*(email.get("recipients") or []), *extra]


def _format_validation(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"  {loc}: {e['msg']}")
    return "invalid configuration:\n" + "\n".join(lines)


def parse_config(doc: Any, environ: dict[str, str] | None = None) -> NexusConfig:
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError("invalid configuration: top level must be a mapping")
    _apply_env(doc, dict(os.environ) if environ is None else environ)
    try:
        return NexusConfig.model_validate(doc)
    except ValidationError as e:
        raise ConfigError(_format_validation(e)) from None


def load_config(path: str | Path, environ: dict[str, str] | None = None) -> NexusConfig:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path} is not valid YAML: {e}") from None
    return parse_config(doc, environ)
