"""`nexus-extproc create-budget | delete-budget | set-active | forecast | alerts | ack-alert | recommend |
export`: the admin API's budget lifecycle and FinOps calls from a terminal."""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import UTC
from typing import Any

import grpc

from nexus_extproc.api import budget_admin_pb2 as pb
from nexus_extproc.api import budget_admin_pb2_grpc as pb_grpc
from nexus_extproc.budget.reports import parse_range, to_table
from nexus_extproc.config import ScopeConfig
from nexus_extproc.edge.pb_terms import ACTION_TO_PB
from nexus_extproc.metering.money import usd_to_micros

COMMANDS = ("create-budget", "delete-budget", "set-active", "forecast", "alerts", "ack-alert", "recommend", "export")


def add_finops_args(sub: argparse._SubParsersAction, common: Any) -> None:
    actor = os.environ.get("USER", "cli")
    p = sub.add_parser("create-budget", help="add a budget at runtime (persisted, audited, on every replica)")
    common(p)
    p.add_argument("name")
    p.add_argument("limit_usd", nargs="?", default="0", help="the limit in USD (or --limit-tokens)")
    p.add_argument("--limit-tokens", type=int, default=0, help="a limit in tokens (input + output) instead")
    p.add_argument("--period", default="monthly",
                   help='daily, weekly, monthly (default), hourly, "every 10m" or "rolling 1h"')
    p.add_argument("--models", default="", help="comma list of model globs the budget allows")
    p.add_argument("--timezone", default="")
    p.add_argument("--scope", action="append", default=[], metavar="KEY=VALUE",
                   help="user, team, agent, tool, session (\"*\": one budget per distinct value), model (glob), "
                        "backend_type")
    p.add_argument("--soft-limit-percent", type=float, default=0.0)
    p.add_argument("--hard-limit-action", choices=sorted(ACTION_TO_PB))
    p.add_argument("--alert-thresholds", default="", help="comma list of percentages")
    p.add_argument("--max-instances", type=int, default=0)
    p.add_argument("--inactive", action="store_true")
    p.add_argument("--actor", default=actor)
    p = sub.add_parser("delete-budget", help="remove a budget created at runtime (audited)")
    common(p)
    p.add_argument("name")
    p.add_argument("--actor", default=actor)
    p = sub.add_parser("set-active", help="enforce a budget again, or track it without enforcing (audited)")
    common(p)
    p.add_argument("name")
    p.add_argument("state", choices=("on", "off"))
    p.add_argument("--actor", default=actor)
    p = sub.add_parser("forecast", help="7/30/90-day and end-of-period projections with 80 %% intervals")
    common(p)
    p.add_argument("--budget", default="")
    p = sub.add_parser("alerts", help="alert history, newest first")
    common(p)
    p.add_argument("--limit", type=int, default=50)
    p = sub.add_parser("ack-alert", help="acknowledge an alert (audited)")
    common(p)
    p.add_argument("id", type=int)
    p.add_argument("--actor", default=actor)
    p = sub.add_parser("recommend", help="cost recommendations with their potential savings")
    common(p)
    p.add_argument("--from", dest="start", help="YYYY-MM-DD (default: first of this month)")
    p.add_argument("--to", dest="end", help="YYYY-MM-DD inclusive (default: today)")
    p = sub.add_parser("export", help="spend as a file: a FOCUS 1.2 CSV (default) or the roll-up CSV")
    common(p)
    p.add_argument("--from", dest="start")
    p.add_argument("--to", dest="end")
    p.add_argument("--as", dest="export_format", choices=("focus", "csv"), default="focus")
    p.add_argument("--group-by", default="day")
    p.add_argument("-o", "--output", help="file to write (default: stdout)")


def _ts_range(req: Any, start: str | None, end: str | None) -> None:
    lo, hi = parse_range(start, end)
    getattr(req, "from").FromSeconds(int(lo))
    req.to.FromSeconds(int(hi))


def _show(rows: list[dict[str, object]], columns: tuple[str, ...], fmt: str) -> None:
    if fmt == "json":
        print(json.dumps(rows, indent=2))
    else:
        print(to_table(rows, columns))


def _proj(p: Any) -> str:
    return f"${p.point_micros / 1e6:,.2f} (${p.low_micros / 1e6:,.2f}-${p.high_micros / 1e6:,.2f})"


def run_finops(args: argparse.Namespace, token: str) -> int:
    md = (("authorization", f"Bearer {token}"),)
    with grpc.insecure_channel(args.admin) as ch:
        stub = pb_grpc.BudgetAdminServiceStub(ch)
        try:
            if args.cmd == "create-budget":
                scope = pb.BudgetScope()
                for kv in args.scope:
                    k, _, v = kv.partition("=")
                    if k not in ScopeConfig.model_fields or not v:
                        raise SystemExit(f"nexus-extproc: bad --scope {kv!r}")
                    setattr(scope, k, v)
                req = pb.CreateBudgetRequest(
                    name=args.name, period=args.period, timezone=args.timezone,
                    limit_micros=usd_to_micros(args.limit_usd), limit_tokens=args.limit_tokens,
                    models=[m.strip() for m in args.models.split(",") if m.strip()],
                    soft_limit_percent=args.soft_limit_percent,
                    hard_limit_action=ACTION_TO_PB[args.hard_limit_action] if args.hard_limit_action
                    else pb.HARD_LIMIT_ACTION_UNSPECIFIED,
                    alert_thresholds=[float(t) for t in args.alert_thresholds.split(",") if t],
                    max_instances=args.max_instances, inactive=args.inactive, actor=args.actor)
                if args.scope:
                    req.scope.CopyFrom(scope)
                b = stub.CreateBudget(req, metadata=md, timeout=10).budget
                limit = f"{b.limit_micros:,} tokens" if args.limit_tokens else f"${b.limit_micros / 1e6:,.2f}"
                print(f"created {b.name}: {limit}, period {b.period}")
            elif args.cmd == "delete-budget":
                stub.DeleteBudget(pb.DeleteBudgetRequest(name=args.name, actor=args.actor), metadata=md, timeout=10)
                print(f"deleted {args.name}")
            elif args.cmd == "set-active":
                b = stub.SetActive(pb.SetActiveRequest(name=args.name, active=args.state == "on", actor=args.actor),
                                   metadata=md, timeout=10).budget
                print(f"{b.name}: {'active (enforced)' if b.active else 'inactive (tracked, not enforced)'}")
            elif args.cmd == "forecast":
                names = [args.budget] if args.budget else [b.name for b in stub.GetStatus(
                    pb.GetStatusRequest(), metadata=md, timeout=10).budgets]
                rows: list[dict[str, object]] = []
                for n in names:
                    f = stub.GetForecast(pb.GetForecastRequest(name=n), metadata=md, timeout=30).forecast
                    h = {int(p.days): _proj(p) for p in f.horizons}
                    rows.append({"budget": n, "trend": f.trend, "history_days": f.history_days,
                                 "7d": h.get(7, ""), "30d": h.get(30, ""), "90d": h.get(90, ""),
                                 "period_end": _proj(f.end_of_period),
                                 "overrun": "likely" if f.overrun_likely else "no"})
                _show(rows, ("budget", "trend", "history_days", "7d", "30d", "90d", "period_end", "overrun"),
                      args.format)
            elif args.cmd == "alerts":
                alerts = stub.ListAlerts(pb.ListAlertsRequest(limit=args.limit), metadata=md, timeout=10).alerts
                _show([{"id": a.id, "time": a.time.ToDatetime(UTC).strftime("%Y-%m-%dT%H:%MZ"), "budget": a.budget,
                        "period": a.period, "threshold": a.threshold, "spent_usd": f"{a.spend_micros / 1e6:.2f}",
                        "delivery": a.delivery, "attempts": a.attempts, "acked_by": a.acked_by} for a in alerts],
                      ("id", "time", "budget", "period", "threshold", "spent_usd", "delivery", "attempts",
                       "acked_by"), args.format)
            elif args.cmd == "ack-alert":
                a = stub.AckAlert(pb.AckAlertRequest(id=args.id, actor=args.actor), metadata=md, timeout=10).alert
                print(f"alert {a.id} acknowledged by {a.acked_by}")
            elif args.cmd == "recommend":
                req = pb.ListRecommendationsRequest()
                _ts_range(req, args.start, args.end)
                recs = stub.ListRecommendations(req, metadata=md, timeout=30).recommendations
                if args.format == "json":
                    print(json.dumps([{"kind": r.kind, "subject": r.subject, "summary": r.summary,
                                       "potential_saving_usd": r.potential_saving_micros / 1e6,
                                       "data": json.loads(r.data_json)} for r in recs], indent=2))
                else:
                    for r in recs:
                        saving = r.potential_saving_micros / 1e6
                        shown = f"{saving:,.2f}" if saving >= 1 else f"{saving:.4f}"
                        print(f"[{r.kind}] {r.subject}: save up to ${shown}\n  {r.summary}")
                    if not recs:
                        print("no recommendations for this range")
            else:
                req = pb.ExportSpendRequest(format=args.export_format,
                                            group_by=[g for g in args.group_by.split(",") if g])
                _ts_range(req, args.start, args.end)
                data = stub.ExportSpend(req, metadata=md, timeout=60).data
                if args.output:
                    with open(args.output, "wb") as f:
                        f.write(data)
                else:
                    sys.stdout.write(data.decode())
        except grpc.RpcError as e:
            print(f"nexus-extproc: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    return 0
