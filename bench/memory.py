"""Memory over many requests: the ext_proc server's RSS from 20k to 80k requests, against plain Envoy's own
growth over the same count, in one run.

Starts an upstream (Envoy direct_response, as in overhead.py), plain Envoy and Envoy + ext_proc (budget on,
SQLite ledger), drives each with wrk in bounded slices and samples RSS after each slice. A leak shows as
bytes per request past the warm-up point; caches that fill and stop show as growth before it only.

    python bench/memory.py [--requests 80000] [--from 20000] [--settlement ext_proc|envoy] [--json]

`--settlement envoy` measures the path where Envoy reads the response and reports it on the access log (two
ext_proc messages per request, one access-log entry); the default, the server reading it (three messages).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from overhead import Bench, chat_body, children_of, run_wrk  # noqa: E402

from nexus_dev.envoy_config import EnvoyParams, Upstream, build_config, plain_config  # noqa: E402
from nexus_dev.stack import HOST, free_port  # noqa: E402


def rss(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except FileNotFoundError:
            pass
    return total


def drive(b: Bench, port: int, pids: list[int], target: int, body: str) -> list[tuple[int, int]]:
    """(requests so far, RSS) after each slice until `target` requests went through."""
    url = f"http://{HOST}:{port}/v1/chat/completions"
    done, samples = 0, [(0, rss(pids))]
    while done < target:
        _, _, _, errs, total = run_wrk(b.wrk, url, body, 16, 2, {}, b.work)
        if errs:
            raise RuntimeError(f"{errs} errors under load")
        done += total
        samples.append((done, rss(pids)))
    return samples


def growth(samples: list[tuple[int, int]], start: int) -> tuple[float, int, int]:
    """Bytes per request from the first sample at or past `start` to the last; and the two RSS values."""
    first = next(s for s in samples if s[0] >= start)
    last = samples[-1]
    return (last[1] - first[1]) / max(1, last[0] - first[0]), first[1], last[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=80_000)
    ap.add_argument("--from", dest="start", type=int, default=20_000)
    ap.add_argument("--store", choices=["sqlite", "none"], default="sqlite", help="ledger for the budget, or none")
    ap.add_argument("--settlement", choices=["ext_proc", "envoy"], default="ext_proc",
                    help="who reads the response (docs/streaming.md)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    args.duration = 2
    b = Bench(args)
    body = chat_body(1024)
    out: dict[str, object] = {}
    try:
        up = b.start_upstream()
        pe, pport, _ = b.start_envoy(plain_config(free_port(), free_port(), up), "plain")
        store = {"kind": "sqlite", "path": str(b.work / "memory.db")} if args.store == "sqlite" else None
        x, g = b.start_extproc(store, 1, settlement=args.settlement)
        params = EnvoyParams(listen_address=HOST, listen_port=free_port(), admin_port=free_port(),
                             extproc_ports=[g], upstreams=[Upstream("openai", HOST, up)], access_log_path="/dev/null",
                             settlement=args.settlement)
        ee, eport, _ = b.start_envoy(build_config(params), "ext")
        plain = drive(b, pport, [pe.pid], args.requests, body)
        ext = drive(b, eport, children_of(x.pid), args.requests, body)
        p_rate, p0, p1 = growth(plain, args.start)
        x_rate, x0, x1 = growth(ext, args.start)
        out = {"requests": ext[-1][0], "from": args.start, "store": args.store, "settlement": args.settlement,
               "plain_envoy": {"bytes_per_request": round(p_rate, 1), "rss_from": p0, "rss_to": p1},
               "ext_proc": {"bytes_per_request": round(x_rate, 1), "rss_from": x0, "rss_to": x1,
                            "rss_start": ext[0][1], "growth_bytes": x1 - x0},
               "ext_proc_samples": ext}
        if args.json:
            print(json.dumps(out))
        else:
            print(f"plain Envoy: {p_rate:+.1f} B/request from {args.start} to {plain[-1][0]} requests "
                  f"(RSS {p0 / 2**20:.1f} → {p1 / 2**20:.1f} MiB)")
            print(f"ext_proc:    {x_rate:+.1f} B/request from {args.start} to {ext[-1][0]} requests "
                  f"(RSS {x0 / 2**20:.1f} → {x1 / 2**20:.1f} MiB, {(x1 - x0) / 2**20:+.2f} MiB; "
                  f"{ext[0][1] / 2**20:.1f} MiB at start)")
            print(f"ratio of per-request growth, ext_proc ÷ plain Envoy: "
                  f"{x_rate / p_rate if p_rate > 0 else float('inf'):.2f}×")
        return 0
    finally:
        b.stack.stop()


if __name__ == "__main__":
    raise SystemExit(main())
