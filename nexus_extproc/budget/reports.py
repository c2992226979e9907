"""Spend reports: roll the ledger's budget × model × day aggregates up to what was asked, as rows or CSV."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from nexus_extproc.ledger import SpendAgg

# `day` is the UTC day; `week` its ISO week (2026-W49) and `month` its month (2026-12), the daily, weekly and
# monthly roll-ups. `tag` splits a settlement's tag list: one with two tags counts in both tags' rows, so tag
# rows overlap and their sum is not the total (every other grouping partitions it).
GROUPS = ("budget", "model", "day", "week", "month", "model_requested", "backend", "team", "agent", "tool", "session",
          "task", "tag")


@dataclass(slots=True)
class SpendRow:
    budget: str = ""
    model: str = ""
    day: str = ""
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_micros: int = 0
    estimate_micros: int = 0
    avoided_micros: int = 0
    model_requested: str = ""
    reaped_micros: int = 0
    week: str = ""
    month: str = ""
    backend: str = ""
    task: str = ""
    tag: str = ""
    team: str = ""
    agent: str = ""
    tool: str = ""
    session: str = ""
    cache_read_tokens: int = 0
    output_reserved: int = 0
    streamed: int = 0


def parse_range(start: str | None, end: str | None, today: date | None = None) -> tuple[float, float]:
    """`YYYY-MM-DD` (inclusive) or ISO timestamps; default: the current UTC month so far."""
    today = today or datetime.now(UTC).date()

    def ts(v: str, end_of_day: bool) -> float:
        if len(v) == 10:
            d = datetime.fromisoformat(v).replace(tzinfo=UTC)
            return (d + timedelta(days=1) if end_of_day else d).timestamp()
        dt = datetime.fromisoformat(v.replace("Z", "+00:00"))
        return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()

    lo = ts(start, False) if start else datetime(today.year, today.month, 1, tzinfo=UTC).timestamp()
    hi = ts(end, True) if end else (datetime(today.year, today.month, today.day, tzinfo=UTC)
                                    + timedelta(days=1)).timestamp()
    if hi <= lo:
        raise ValueError("'to' must be after 'from'")
    return lo, hi


def roll_up(aggs: Iterable[SpendAgg], group_by: Iterable[str]) -> list[SpendRow]:
    keys = [g for g in GROUPS if g in set(group_by)]
    unknown = set(group_by) - set(GROUPS)
    if unknown:
        raise ValueError(f"group_by must be among {', '.join(GROUPS)}")
    out: dict[tuple[str, ...], SpendRow] = {}
    for a in aggs:
        attrs = {"budget": a.budget, "model": a.model, "day": a.day, "week": iso_week(a.day), "month": a.day[:7],
                 "model_requested": a.model_requested, "backend": a.backend, "task": a.task,
                 "team": a.team, "agent": a.agent, "tool": a.tool, "session": a.session}
        for tag in (a.tags.split(",") if a.tags else [""]) if "tag" in keys else [""]:
            attrs["tag"] = tag
            k = tuple(attrs[g] for g in keys)
            row = out.get(k)
            if row is None:
                row = out[k] = SpendRow(**dict(zip(keys, k, strict=True)))  # type: ignore[arg-type]
            row.requests += a.requests
            row.input_tokens += a.input_tokens
            row.output_tokens += a.output_tokens
            row.cost_micros += a.cost
            row.estimate_micros += a.estimate
            row.avoided_micros += a.avoided
            row.reaped_micros += a.reaped
            row.cache_read_tokens += a.cache_read_tokens
            row.output_reserved += a.output_reserved
            row.streamed += a.streamed
    return [out[k] for k in sorted(out)]


def iso_week(day: str) -> str:
    y, w, _ = date.fromisoformat(day).isocalendar()
    return f"{y}-W{w:02d}"


# `model` is the model settled at (the one that answered); `model_requested` the one the client asked for;
# `reaped_usd` the part of `cost_usd` the reaper charged at the estimate (forwarded, its process died).
COLUMNS = ("budget", "model", "day", "week", "month", "backend", "team", "agent", "tool", "session", "task", "tag",
           "requests",
           "input_tokens", "output_tokens", "cost_usd", "estimate_usd", "avoided_usd", "model_requested", "reaped_usd")


def row_dict(r: SpendRow) -> dict[str, object]:
    return {"budget": r.budget, "model": r.model, "day": r.day, "requests": r.requests,
            "input_tokens": r.input_tokens, "output_tokens": r.output_tokens,
            "cost_usd": f"{r.cost_micros / 1e6:.6f}", "estimate_usd": f"{r.estimate_micros / 1e6:.6f}",
            "avoided_usd": f"{r.avoided_micros / 1e6:.6f}", "model_requested": r.model_requested,
            "reaped_usd": f"{r.reaped_micros / 1e6:.6f}", "week": r.week, "month": r.month, "backend": r.backend,
            "task": r.task, "tag": r.tag, "team": r.team, "agent": r.agent, "tool": r.tool, "session": r.session}


def to_csv(rows: Iterable[SpendRow]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(row_dict(r))
    return buf.getvalue()


def to_table(rows: list[dict[str, object]], columns: Iterable[str]) -> str:
    cols = [c for c in columns if any(str(r.get(c, "")) for r in rows)] or list(columns)
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols} if rows else \
        {c: len(c) for c in cols}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in cols)]
    for r in rows:
        lines.append("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols))
    return "\n".join(lines)
