"""`nexus-extproc status | set-limit | reset-limit | override | spend`: the admin gRPC API from a terminal."""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from nexus_extproc.api import budget_admin_pb2 as pb
from nexus_extproc.api import budget_admin_pb2_grpc as pb_grpc
from nexus_extproc.budget.reports import COLUMNS, SpendRow, row_dict, to_csv, to_table
from nexus_extproc.edge.admin_cli_finops import COMMANDS as FINOPS_COMMANDS
from nexus_extproc.edge.admin_cli_finops import add_finops_args, run_finops
from nexus_extproc.edge.pb_terms import ACTION_FROM_PB, ACTION_TO_PB, STATUS_FROM_PB
from nexus_extproc.metering.money import usd_to_micros

STATUS_COLUMNS = ("budget", "period", "status", "spent_usd", "reserved_usd", "limit_usd", "utilization",
                  "action", "override_until", "resets", "source")


def add_admin_args(sub: argparse._SubParsersAction) -> None:
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--admin", default=os.environ.get("NEXUS_ADMIN_ADDR", "127.0.0.1:9091"),
                       help="admin gRPC address (default 127.0.0.1:9091, or $NEXUS_ADMIN_ADDR)")
        p.add_argument("--token-file", help="file holding the admin token (default: $NEXUS_ADMIN_TOKEN)")
        p.add_argument("--format", choices=("table", "json", "csv"), default="table")

    add_finops_args(sub, common)
    p = sub.add_parser("status", help="budget status from the admin API")
    common(p)
    p.add_argument("--budget", default="")
    p = sub.add_parser("set-limit", help="change a budget's limit (persisted, audited)")
    common(p)
    p.add_argument("limit_usd", type=str)
    p.add_argument("--budget", default="global")
    p.add_argument("--soft-limit-percent", type=float, default=0.0)
    p.add_argument("--hard-limit-action", choices=sorted(ACTION_TO_PB))
    p.add_argument("--actor", default=os.environ.get("USER", "cli"))
    p = sub.add_parser("reset-limit", help="drop a budget's runtime settings: the config applies again (audited)")
    common(p)
    p.add_argument("--budget", default="global")
    p.add_argument("--actor", default=os.environ.get("USER", "cli"))
    p = sub.add_parser("override", help="raise a budget's limit until a time; it reverts by itself")
    common(p)
    p.add_argument("limit_usd", type=str)
    p.add_argument("--for", dest="duration", default="24h", help="e.g. 30m, 6h, 2d (default 24h)")
    p.add_argument("--budget", default="global")
    p.add_argument("--actor", default=os.environ.get("USER", "cli"))
    p = sub.add_parser("spend", help="settled spend by budget, model and/or day")
    common(p)
    p.add_argument("--from", dest="start", help="YYYY-MM-DD (default: first of this month)")
    p.add_argument("--to", dest="end", help="YYYY-MM-DD inclusive (default: today)")
    p.add_argument("--group-by", default="model",
                   help="comma list of budget, model, day, week, month, model_requested, backend, team, task, tag")


def _token(args: argparse.Namespace) -> str:
    if args.token_file:
        with open(args.token_file, encoding="utf-8") as f:
            return f.read().strip()
    tok = os.environ.get("NEXUS_ADMIN_TOKEN", "")
    if not tok:
        raise SystemExit("nexus-extproc: no admin token (--token-file or $NEXUS_ADMIN_TOKEN)")
    return tok


def _duration(s: str) -> timedelta:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if not s or s[-1] not in units or not s[:-1].isdigit():
        raise SystemExit(f"nexus-extproc: bad duration {s!r} (use 30m, 6h, 2d)")
    return timedelta(seconds=int(s[:-1]) * units[s[-1]])


def _status_row(b: Any) -> dict[str, object]:
    return {"budget": b.name, "period": b.period, "status": STATUS_FROM_PB.get(b.status, "?"),
            "spent_usd": f"{b.settled_micros / 1e6:.6f}", "reserved_usd": f"{b.reserved_micros / 1e6:.6f}",
            "limit_usd": f"{b.limit_micros / 1e6:.2f}", "utilization": f"{b.utilization_percent:.2f}%",
            "action": ACTION_FROM_PB.get(b.hard_limit_action, "?") if b.active else "inactive",
            "override_until": b.override_until.ToDatetime(UTC).isoformat() if b.HasField("override_until") else "",
            "resets": b.next_reset.ToDatetime(UTC).date().isoformat(),
            "source": _source(b)}


def _source(b: Any) -> str:
    if b.origin == pb.BUDGET_ORIGIN_RUNTIME:
        return "created at runtime" + ("" if b.source != pb.SETTINGS_SOURCE_RUNTIME else f", set by {b.set_by}")
    if b.source != pb.SETTINGS_SOURCE_RUNTIME:
        return "config"
    when = b.set_at.ToDatetime(UTC).strftime("%Y-%m-%dT%H:%MZ") if b.HasField("set_at") else "?"
    return f"runtime ({b.set_by}, {when})"


def _print(rows: list[dict[str, object]], columns: tuple[str, ...], fmt: str) -> None:
    if fmt == "json":
        print(json.dumps(rows, indent=2))
    elif fmt == "csv":
        import csv

        w = csv.DictWriter(sys.stdout, fieldnames=columns, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    else:
        print(to_table(rows, columns))


def run_admin(args: argparse.Namespace) -> int:
    if args.cmd in FINOPS_COMMANDS:
        return run_finops(args, _token(args))
    md = (("authorization", f"Bearer {_token(args)}"),)
    with grpc.insecure_channel(args.admin) as ch:
        stub = pb_grpc.BudgetAdminServiceStub(ch)
        try:
            if args.cmd == "status":
                budgets = list(stub.GetStatus(pb.GetStatusRequest(name=args.budget), metadata=md,
                                              timeout=10).budgets)
            elif args.cmd == "set-limit":
                budgets = [stub.SetLimit(pb.SetLimitRequest(
                    name=args.budget, limit_micros=usd_to_micros(args.limit_usd),
                    soft_limit_percent=args.soft_limit_percent,
                    hard_limit_action=ACTION_TO_PB.get(args.hard_limit_action, pb.HARD_LIMIT_ACTION_UNSPECIFIED),
                    actor=args.actor),
                    metadata=md, timeout=10).budget]
            elif args.cmd == "reset-limit":
                budgets = [stub.ResetLimit(pb.ResetLimitRequest(name=args.budget, actor=args.actor),
                                           metadata=md, timeout=10).budget]
            elif args.cmd == "override":
                until = timestamp_pb2.Timestamp()
                until.FromDatetime(datetime.now(UTC) + _duration(args.duration))
                budgets = [stub.SetOverride(pb.SetOverrideRequest(
                    name=args.budget, limit_micros=usd_to_micros(args.limit_usd), until=until, actor=args.actor),
                    metadata=md, timeout=10).budget]
            else:
                from nexus_extproc.budget.reports import parse_range

                lo, hi = parse_range(args.start, args.end)
                req = pb.ListSpendRequest(group_by=[g for g in args.group_by.split(",") if g])
                getattr(req, "from").FromSeconds(int(lo))
                req.to.FromSeconds(int(hi))
                resp = stub.ListSpend(req, metadata=md, timeout=30)
                rows = [SpendRow(r.budget, r.model, r.day, r.requests, r.input_tokens, r.output_tokens,
                                 r.cost_micros, r.estimate_micros, r.avoided_micros,
                                 reaped_micros=r.reaped_micros, week=r.week, month=r.month, backend=r.backend,
                                 task=r.task, tag=r.tag, team=r.team) for r in resp.rows]
                if args.format == "csv":
                    sys.stdout.write(to_csv(rows))
                else:
                    _print([row_dict(r) for r in rows], COLUMNS, args.format)
                return 0
        except grpc.RpcError as e:
            print(f"nexus-extproc: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    _print([_status_row(b) for b in budgets], STATUS_COLUMNS, args.format)
    return 0
