"""Overhead of the ext_proc filter against plain Envoy, measured in one run on this machine.

Starts, side by side: an upstream (Envoy serving a canned OpenAI chat response, so the upstream is never
the bottleneck; the Python fake upstream for multi-chunk SSE and time-to-first-token), plain Envoy →
upstream, and Envoy + ext_proc → the same upstream. Drives each with the same wrk load and prints req/s,
p50/p99 latency, CPU per request of Envoy and of the ext_proc processes (from /proc), and the ratios.

    python bench/overhead.py [--duration 8] [--quick | --modes-only | --profile FILE.svg] [--json FILE]

`--json FILE` writes every figure (each case's req/s, p50/p99, CPU per request of Envoy and of ext_proc, ext_proc
messages per request, the floor of a null grpc.aio processor, per-chunk CPU, TTFT, ratios) for machines.

Everything binds to 127.0.0.1; every load is bounded by --duration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nexus_dev.envoy_config import EnvoyParams, Upstream, build_config, dump, plain_config  # noqa: E402
from nexus_dev.stack import HOST, Stack, envoy_binary, free_port, is_free, wait_http  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def ensure_wrk() -> str:
    w = shutil.which("wrk")
    if w:
        return w
    subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True, capture_output=True)
    return shutil.which("wrk") or "wrk"


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime (this process; threads included)
        except (FileNotFoundError, IndexError):
            pass
    return total / TICKS


def children_of(pid: int) -> list[int]:
    out = [pid]
    try:
        for line in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split():
            out += children_of(int(line))
    except ValueError:
        pass
    return out


def canned_chat(prompt_tokens: int) -> str:
    return json.dumps({"id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": "gpt-4o-mini",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                    "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 1,
                                 "total_tokens": prompt_tokens + 1}})


def canned_sse(prompt_tokens: int, events: int = 20) -> str:
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "gpt-4o-mini",
             "choices": [{"index": 0, "delta": {"content": " tok"}, "finish_reason": None}]}
    body = "".join(f"data: {json.dumps(chunk)}\n\n" for _ in range(events))
    body += "data: " + json.dumps({**chunk, "choices": [], "usage": {
        "prompt_tokens": prompt_tokens, "completion_tokens": events, "total_tokens": prompt_tokens + events}}) + "\n\n"
    return body + "data: [DONE]\n\n"


def upstream_envoy_config(port: int, admin: int) -> dict:
    """An Envoy that answers like OpenAI from memory: a fast upstream, so the comparison measures the proxy."""
    def route(stream: bool) -> dict:
        return {"match": {"prefix": "/", "headers": [{"name": "x-bench-stream", "present_match": True}]}
                if stream else {"prefix": "/"},
                "direct_response": {"status": 200, "body": {"inline_string": canned_sse(300) if stream
                                                            else canned_chat(300)}},
                "response_headers_to_add": [{"header": {"key": "content-type", "value": "text/event-stream"
                                                        if stream else "application/json"},
                                             "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]}
    return {"admin": {"address": {"socket_address": {"address": HOST, "port_value": admin}}},
            "static_resources": {"listeners": [{"name": "up", "address": {"socket_address": {
                "address": HOST, "port_value": port}}, "per_connection_buffer_limit_bytes": 8 << 20,
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager"
                                 ".v3.HttpConnectionManager", "stat_prefix": "up",
                        "route_config": {"virtual_hosts": [{"name": "up", "domains": ["*"],
                                                            "routes": [route(True), route(False)]}]},
                        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}]}]}]}}


def chat_body(prompt_bytes: int, stream: bool = False) -> str:
    words = ("budget " * (prompt_bytes // 7 + 1))[:prompt_bytes]
    doc: dict = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": words}], "max_tokens": 64}
    if stream:
        doc["stream"] = True
        doc["stream_options"] = {"include_usage": True}
    return json.dumps(doc)


@dataclass
class Result:
    name: str
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    requests: int
    envoy_cpu_us: float
    extproc_cpu_us: float


def run_wrk(wrk: str, url: str, body: str, conns: int, duration: float, headers: dict[str, str],
            workdir: Path) -> tuple[float, float, float, int, int]:
    script = workdir / f"post-{abs(hash((body, tuple(headers.items()))))}.lua"
    hdrs = "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in headers.items())
    body_file = script.with_suffix(".json")
    body_file.write_text(body)
    script.write_text(f'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n{hdrs}'
                      f'local f = io.open("{body_file}", "rb")\nwrk.body = f:read("*a")\nf:close()\n')
    out = subprocess.run([wrk, "-t2", f"-c{conns}", f"-d{int(duration)}s", "--latency", "-s", str(script), url],
                         capture_output=True, text=True, timeout=duration + 60).stdout
    if "Requests/sec" not in out:
        raise RuntimeError(f"wrk failed: {out[-2000:]}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]

    def pct(p: str) -> float:
        m = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out)
        if not m:
            return float("nan")
        v = float(m.group(1))
        return v / 1000 if m.group(2) == "us" else v * 1000 if m.group(2) == "s" else v

    errs = 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errs += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errs += sum(int(x) for x in m.groups())
    return rps, pct("50"), pct("99"), errs, total


def envoy_stat(admin_port: int, name: str) -> int:
    with urllib.request.urlopen(f"http://{HOST}:{admin_port}/stats?filter={name}") as r:
        for line in r.read().decode().splitlines():
            k, _, v = line.partition(": ")
            if k.endswith(name):
                return int(v)
    return 0


def messages_per_request(port: int, admin: int, body: str, n: int = 50) -> float:
    """ext_proc messages Envoy sent per request, over n sequential requests (no load running)."""
    before = envoy_stat(admin, "ext_proc.stream_msgs_received")
    for _ in range(n):
        req = urllib.request.Request(f"http://{HOST}:{port}/v1/chat/completions", data=body.encode(),
                                     headers={"content-type": "application/json"})
        urllib.request.urlopen(req, timeout=10).read()
    time.sleep(0.3)
    return (envoy_stat(admin, "ext_proc.stream_msgs_received") - before) / n


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.wrk = ensure_wrk()
        self.stack = Stack()
        self.work = self.stack.workdir
        self.results: list[Result] = []

    def start_upstream(self) -> int:
        port, admin = free_port(), free_port()
        cfg = self.work / "upstream.yaml"
        cfg.write_text(yaml.safe_dump(upstream_envoy_config(port, admin)))
        p = self.stack._spawn([envoy_binary(), "-c", str(cfg), "--concurrency", "1",
                               "--log-level", "error", "--base-id", str(free_port())], "upstream")
        wait_http(f"http://{HOST}:{admin}/ready", proc=p)
        return port

    def start_envoy(self, cfg_doc: dict, name: str) -> tuple[subprocess.Popen[bytes], int, int]:
        listen = cfg_doc["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
        admin = cfg_doc["admin"]["address"]["socket_address"]["port_value"]
        cfg = self.work / f"{name}.yaml"
        cfg.write_text(dump(cfg_doc))
        p = self.stack._spawn([envoy_binary(), "-c", str(cfg), "--concurrency", "2",
                               "--log-level", "error", "--base-id", str(free_port())], name)
        wait_http(f"http://{HOST}:{admin}/ready", proc=p)
        return p, listen, admin

    def start_extproc(self, budget: dict | None, workers: int, budgets: list[dict] | None = None,
                      uds: str | None = None, settlement: str = "ext_proc") -> tuple[subprocess.Popen[bytes], int]:
        grpc_port, admin = free_port(), free_port()
        while workers > 1 and not all(is_free(grpc_port + i) for i in range(workers)):
            grpc_port = free_port()
        doc: dict = {"backends": {"openai": {"cluster": "openai", "type": "cloud", "provider": "openai",
                                             "default": True}},
                     "server": {"grpc_port": grpc_port, "admin_port": admin, "workers": workers,
                                "log_level": "WARNING", "uds_path": uds, "settlement": settlement}}
        if budget:
            doc["store"] = budget
            if budgets:
                doc["budgets"] = budgets
            else:
                doc["budget"] = {"monthly_limit_usd": 1_000_000}
        cfg = self.work / f"extproc-{grpc_port}.yaml"
        cfg.write_text(yaml.safe_dump(doc))
        p = self.stack._spawn([sys.executable, "-m", "nexus_extproc", "serve", "--config", str(cfg)],
                              f"extproc-{grpc_port}")
        wait_http(f"http://{HOST}:{admin}/readyz", timeout=60, proc=p)
        return p, grpc_port

    def measure(self, name: str, port: int, envoy: subprocess.Popen[bytes], extproc: subprocess.Popen[bytes] | None,
                body: str, conns: int, headers: dict[str, str] | None = None) -> Result:
        url = f"http://{HOST}:{port}/v1/chat/completions"
        run_wrk(self.wrk, url, body, conns, 1, headers or {}, self.work)  # warm-up
        e0 = cpu_seconds([envoy.pid])
        x_pids = children_of(extproc.pid) if extproc else []
        x0 = cpu_seconds(x_pids)
        rps, p50, p99, errs, total = run_wrk(self.wrk, url, body, conns, self.args.duration, headers or {},
                                             self.work)
        e1, x1 = cpu_seconds([envoy.pid]), cpu_seconds(x_pids)
        r = Result(name, rps, p50, p99, errs, total, (e1 - e0) / max(total, 1) * 1e6,
                   (x1 - x0) / max(total, 1) * 1e6)
        self.results.append(r)
        print(f"  {name:<34} {rps:>9.0f} req/s  p50 {p50:>7.2f} ms  p99 {p99:>7.2f} ms  errors {errs:<5} "
              f"envoy {r.envoy_cpu_us:>6.0f} µs/req  ext_proc {r.extproc_cpu_us:>6.0f} µs/req", flush=True)
        return r


FIVE_BUDGETS = [
    {"name": "global", "limit_usd": 1_000_000},
    {"name": "gpt4o", "scope": {"model": "gpt-4o*"}, "limit_usd": 100_000},
    {"name": "cloud", "scope": {"backend_type": "cloud"}, "limit_usd": 100_000},
    {"name": "daily", "period": "daily", "limit_usd": 100_000, "hard_limit_action": "block_all"},
    {"name": "weekly", "period": "weekly", "limit_usd": 100_000},
]


def compare_budget_counts(b: Bench, up: int, body: str, plain: Result, ratios: list[tuple[str, float]]) -> None:
    """One budget vs five matching budgets through Envoy, in alternating rounds so machine noise, which here
    swings single runs by ±30 %, falls on both sides; the paired differences' median is reported."""
    setups = {}
    for name, budgets in (("1 budget", FIVE_BUDGETS[:1]), ("5 budgets", FIVE_BUDGETS)):
        x, g = b.start_extproc({"kind": "sqlite", "path": str(b.work / f"{name[0]}.db")}, 1, budgets)
        params = EnvoyParams(listen_address=HOST, listen_port=free_port(), admin_port=free_port(),
                             extproc_ports=[g], upstreams=[Upstream("openai", HOST, up)], access_log_path="/dev/null")
        e, port, _ = b.start_envoy(build_config(params), f"budgets-{name[0]}")
        setups[name] = (x, e, port)
    runs: dict[str, list[Result]] = {k: [] for k in setups}
    saved = b.args.duration
    b.args.duration = max(3.0, saved / 2)
    for _ in range(b.args.budget_rounds):
        for name, (x, e, port) in setups.items():
            runs[name].append(b.measure(f"Envoy + ext_proc + sqlite, {name}", port, e, x, body, 16))
    b.args.duration = saved
    diffs = sorted(f.extproc_cpu_us - o.extproc_cpu_us
                   for o, f in zip(runs["1 budget"], runs["5 budgets"], strict=True))
    rps = {k: statistics.median(r.rps for r in v) for k, v in runs.items()}
    print(f"    five matching budgets vs one, ext_proc CPU/req, paired median of {len(diffs)} rounds: "
          f"{statistics.median(diffs):+.0f} µs (rounds {', '.join(f'{d:+.0f}' for d in diffs)})")
    ratios.append(("1 KB JSON c=16, 5 budgets (sqlite, median)", rps["5 budgets"] / plain.rps))


def settle_latency(url: str, db: Path, body: str, headers: dict[str, str], n: int) -> tuple[float, float]:
    """p50/p99 ms from the client reading a stream's last byte to its settlement row in the ledger, over n
    sequential streams (the ledger polled every 2 ms on a read-only connection)."""
    import sqlite3

    import httpx

    lags: list[float] = []
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    with httpx.Client(timeout=30) as c:
        for _ in range(n):
            with c.stream("POST", url, content=body, headers={"content-type": "application/json", **headers}) as r:
                rid = r.headers.get("x-nexus-request-id")
                for _chunk in r.iter_bytes():
                    pass
            end = time.perf_counter()
            while time.perf_counter() - end < 10:
                if con.execute("SELECT 1 FROM settlements WHERE req_id = ?", (rid,)).fetchone():
                    break
                time.sleep(0.002)
            lags.append((time.perf_counter() - end) * 1000)
    con.close()
    lags.sort()
    return statistics.median(lags), lags[min(len(lags) - 1, int(len(lags) * 0.99))]


def compare_settlement_modes(b: Bench, fake: int, up: int) -> dict[str, dict[str, float]]:
    """The same traffic through each way of settling it, SQLite budget on, plain Envoy (no filter) alongside: a
    1 KB JSON request (16 connections, canned upstream), and paced streams of 40 and 300 events, each event its
    own chunk, usage requested by the client (8 connections). Per-chunk CPU is the difference between the two
    stream lengths over the 260 extra chunks, so the per-request work cancels."""
    print("\nBy settlement mode (SQLite budget; JSON 1 KB c=16; streams of 40 and 300 paced events c=8)")

    def stream_body(n: int, usage: bool = True) -> str:
        # usage=False: the OpenAI SDK's default, whose usage chunk the server asks for and someone hides.
        return json.dumps({"model": "gpt-4o-mini", "stream": True, "max_tokens": n, "messages": [
            {"role": "user", "content": "hi"}], **({"stream_options": {"include_usage": True}} if usage else {})})

    def paced(n: int) -> dict[str, str]:
        return {"x-fake-completion-tokens": str(n), "x-fake-delay-ms": "2"}

    def streams(r: dict[str, float], url: str, admin: int, e: Any, x: Any, usage: bool, tag: str) -> None:
        for n in (40, 300):
            body = stream_body(n, usage)
            run_wrk(b.wrk, url, body, 8, 1, paced(n), b.work)  # warm-up
            m0, e0 = envoy_stat(admin, "ext_proc.stream_msgs_received"), cpu_seconds([e.pid])
            x0 = cpu_seconds(children_of(x.pid)) if x else 0.0
            _, p50, _, errs, total = run_wrk(b.wrk, url, body, 8, b.args.duration, paced(n), b.work)
            k = max(1, total)
            r[f"{tag}{n}_responses"], r[f"{tag}{n}_errors"], r[f"{tag}{n}_p50_ms"] = total, errs, p50
            r[f"{tag}{n}_messages_per_response"] = round(
                (envoy_stat(admin, "ext_proc.stream_msgs_received") - m0) / k, 2)
            r[f"{tag}{n}_envoy_cpu_us"] = round((cpu_seconds([e.pid]) - e0) / k * 1e6)
            r[f"{tag}{n}_extproc_cpu_us"] = round((cpu_seconds(children_of(x.pid)) - x0) / k * 1e6) if x else 0
        per = "" if tag == "s" else tag + "_"
        r[f"{per}envoy_cpu_us_per_chunk"] = round((r[f"{tag}300_envoy_cpu_us"] - r[f"{tag}40_envoy_cpu_us"]) / 260, 2)
        r[f"{per}extproc_cpu_us_per_chunk"] = round(
            (r[f"{tag}300_extproc_cpu_us"] - r[f"{tag}40_extproc_cpu_us"]) / 260, 2)

    def envoys(mode: str, g: int, **params: Any) -> list[tuple[Any, int, int]]:
        configs = []
        for upstream in (fake, up):
            p = EnvoyParams(listen_address=HOST, listen_port=free_port(), admin_port=free_port(),
                            extproc_ports=[g], upstreams=[Upstream("openai", HOST, upstream)],
                            access_log_path="/dev/null", settlement=mode, **params)
            configs.append(b.start_envoy(build_config(p), f"mode-{mode}-{upstream}-{len(params)}"))
        return configs

    out: dict[str, dict[str, float]] = {}
    for mode in ("plain", "ext_proc", "envoy"):
        x = None
        if mode == "plain":
            e, port, admin = b.start_envoy(plain_config(free_port(), free_port(), fake), "mode-plain")
            ej, jport, jadmin = b.start_envoy(plain_config(free_port(), free_port(), up), "mode-plain-json")
        else:
            db = b.work / f"modes-{mode}.db"
            x, g = b.start_extproc({"kind": "sqlite", "path": str(db)}, 1, settlement=mode)
            (e, port, admin), (ej, jport, jadmin) = envoys(mode, g)
        r: dict[str, float] = {}
        json_res = b.measure(f"{mode}: 1 KB JSON", jport, ej, x, chat_body(1024), 16)
        r.update(json_rps=round(json_res.rps), json_envoy_cpu_us=round(json_res.envoy_cpu_us),
                 json_extproc_cpu_us=round(json_res.extproc_cpu_us), json_p50_ms=json_res.p50_ms)
        if x is not None:
            r["json_messages_per_request"] = round(messages_per_request(jport, jadmin, chat_body(1024)), 2)
        url = f"http://{HOST}:{port}/v1/chat/completions"
        streams(r, url, admin, e, x, True, "s")
        if mode == "envoy":
            # The OpenAI SDK's default stream: its added usage chunk hidden by Envoy's Lua filter (the default) ...
            streams(r, url, admin, e, x, False, "lua")
            # ... or by the server on ext_proc's STREAMED path (hide_usage_in="server"), with the same server.
            (e2, port2, admin2), _ = envoys(mode, g, hide_usage_in="server")
            streams(r, f"http://{HOST}:{port2}/v1/chat/completions", admin2, e2, x, False, "srv")
        sse = stream_body(20)
        r["ttft_ms"] = round(asyncio.run(ttft(url, sse, 40)), 2)
        if mode != "plain":
            r["settle_p50_ms"], r["settle_p99_ms"] = (round(v, 1) for v in settle_latency(
                url, b.work / f"modes-{mode}.db", sse, {"x-fake-completion-tokens": "20"}, 100))
        out[mode] = r
        print(f"  {mode:<9} JSON: {r.get('json_messages_per_request', 0)} messages, ext_proc "
              f"{r['json_extproc_cpu_us']} µs, Envoy {r['json_envoy_cpu_us']} µs/req, {r['json_rps']} req/s | "
              f"stream: {r['s40_messages_per_response']} / {r['s300_messages_per_response']} messages (40 / 300 "
              f"events); per chunk ext_proc {r['extproc_cpu_us_per_chunk']} µs, Envoy {r['envoy_cpu_us_per_chunk']} "
              f"µs; TTFT {r['ttft_ms']} ms; settled after the stream p50/p99 "
              f"{r.get('settle_p50_ms', '-')} / {r.get('settle_p99_ms', '-')} ms", flush=True)
        if mode == "envoy":
            for tag, who in (("lua", "Envoy's Lua filter"), ("srv", "the server (STREAMED)")):
                print(f"  {'':<9} default OpenAI stream, usage chunk hidden by {who}: "
                      f"{r[f'{tag}40_messages_per_response']} / {r[f'{tag}300_messages_per_response']} messages; "
                      f"per chunk ext_proc {r[f'{tag}_extproc_cpu_us_per_chunk']} µs, "
                      f"Envoy {r[f'{tag}_envoy_cpu_us_per_chunk']} µs", flush=True)
    # Envoy mode with Envoy and the server on a Unix socket (server.uds_path): the JSON case only.
    sock = str(b.work / "modes-uds.sock")
    xu, _ = b.start_extproc({"kind": "sqlite", "path": str(b.work / "modes-uds.db")}, 1, uds=sock,
                            settlement="envoy")
    pu = EnvoyParams(listen_address=HOST, listen_port=free_port(), admin_port=free_port(), extproc_uds=[sock],
                     upstreams=[Upstream("openai", HOST, up)], access_log_path="/dev/null", settlement="envoy")
    eu, uport, _ = b.start_envoy(build_config(pu), "mode-envoy-uds")
    uds = b.measure("envoy over a Unix socket: 1 KB JSON", uport, eu, xu, chat_body(1024), 16)
    out["envoy"].update(uds_json_rps=round(uds.rps), uds_json_extproc_cpu_us=round(uds.extproc_cpu_us),
                        uds_json_envoy_cpu_us=round(uds.envoy_cpu_us),
                        uds_json_rps_ratio=round(uds.rps / max(1, out["plain"]["json_rps"]), 3))
    for tag in ("lua", "srv"):
        out["envoy"][f"{tag}_envoy_cpu_us_per_chunk_above_plain"] = round(
            out["envoy"][f"{tag}_envoy_cpu_us_per_chunk"] - out["plain"]["envoy_cpu_us_per_chunk"], 2)
    for mode in ("ext_proc", "envoy"):
        out[mode]["envoy_cpu_us_per_chunk_above_plain"] = round(
            out[mode]["envoy_cpu_us_per_chunk"] - out["plain"]["envoy_cpu_us_per_chunk"], 2)
        out[mode]["ttft_added_ms"] = round(out[mode]["ttft_ms"] - out["plain"]["ttft_ms"], 2)
        out[mode]["json_rps_ratio"] = round(out[mode]["json_rps"] / max(1, out["plain"]["json_rps"]), 3)
    return out


def profile(b: Bench, up: int, out: str, mode: str) -> None:
    """A py-spy flame graph of the server (every worker process) while 16 connections send 1 KB JSON requests
    through Envoy with the SQLite budget on: the server runs under `py-spy record`, so anyone can repeat the
    profile the issue's figures came from."""
    spy = Path(sys.executable).with_name("py-spy")
    grpc_port, admin = free_port(), free_port()
    doc = {"backends": {"openai": {"cluster": "openai", "type": "cloud", "provider": "openai", "default": True}},
           "server": {"grpc_port": grpc_port, "admin_port": admin, "log_level": "WARNING", "settlement": mode},
           "store": {"kind": "sqlite", "path": str(b.work / "profile.db")},
           "budget": {"monthly_limit_usd": 1_000_000}}
    cfg = b.work / "profile.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    fmt = "speedscope" if out.endswith(".json") else "flamegraph"
    p = b.stack._spawn([str(spy), "record", "--rate", "250", "--subprocesses", "--format", fmt, "--output", out,
                        "--", sys.executable, "-m", "nexus_extproc", "serve", "--config", str(cfg)], "profiled")
    wait_http(f"http://{HOST}:{admin}/readyz", timeout=60, proc=p)
    params = EnvoyParams(listen_address=HOST, listen_port=free_port(), admin_port=free_port(),
                         extproc_ports=[grpc_port], upstreams=[Upstream("openai", HOST, up)],
                         access_log_path="/dev/null", settlement=mode)
    _, port, _ = b.start_envoy(build_config(params), "profile-envoy")
    rps, p50, _, errs, total = run_wrk(b.wrk, f"http://{HOST}:{port}/v1/chat/completions", chat_body(1024), 16,
                                       b.args.duration, {}, b.work)
    p.send_signal(signal.SIGINT)  # py-spy writes the graph when its target ends
    p.wait(timeout=60)
    print(f"profile ({mode} settlement): {total} requests, {rps:.0f} req/s, p50 {p50:.2f} ms, errors {errs}; "
          f"flame graph in {out}")


async def ttft(url: str, body: str, n: int) -> float:
    """Median time from sending the request to the first SSE data line, over n sequential requests."""
    import httpx

    times = []
    async with httpx.AsyncClient(timeout=30) as c:
        for _ in range(n):
            t0 = time.perf_counter()
            async with c.stream("POST", url, content=body, headers={"content-type": "application/json",
                                                                     "x-fake-delay-ms": "20"}) as r:
                first = True
                async for line in r.aiter_lines():
                    if first and line.startswith("data:"):
                        times.append(time.perf_counter() - t0)
                        first = False
    return statistics.median(times) * 1000


def micro_benchmarks() -> None:
    """In-process CPU figures for the request path: multi-turn caching and event-loop responsiveness."""
    from nexus_extproc.app import build
    from nexus_extproc.config import parse_config
    from nexus_extproc.request.pipeline import RequestState

    cfg = parse_config({"backends": {"openai": {"cluster": "openai", "type": "cloud", "provider": "openai",
                                                "default": True}}}, environ={})
    comps = build(cfg)
    proc = comps.processor
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}: " + "context " * 290}
             for i in range(50)]  # ~100 KB conversation
    base = json.dumps({"model": "gpt-4o", "messages": turns}).encode()

    async def one(body: bytes) -> None:
        st = RequestState()
        proc.request_headers(st, {":method": "POST", ":path": "/v1/chat/completions",
                                  "content-type": "application/json"}, False)
        await proc.request_body(st, body)

    async def main() -> None:
        t0 = time.process_time()
        await one(base)
        cold = (time.process_time() - t0) * 1000
        samples = []
        for i in range(30):
            body = json.dumps({"model": "gpt-4o", "messages": [*turns, {"role": "user", "content": f"new {i}"}]})
            t0 = time.process_time()
            await one(body.encode())
            samples.append((time.process_time() - t0) * 1000)
        print(f"  100 KB conversation, first sight:            {cold:6.2f} ms CPU")
        print(f"  same conversation + one new message (median): {statistics.median(samples):6.2f} ms CPU")
        # Event-loop lag while a 400 KB prompt is counted (in a worker thread above 32 KB).
        big = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "word7 " * 57000}]})
        lags = []

        async def ticker() -> None:
            while True:
                t = time.perf_counter()
                await asyncio.sleep(0.001)
                lags.append((time.perf_counter() - t - 0.001) * 1000)

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0.01)
        lags.clear()
        t0 = time.perf_counter()
        await one(big.encode())
        took = (time.perf_counter() - t0) * 1000
        task.cancel()
        print(f"  400 KB prompt counted in {took:.1f} ms; max event-loop lag meanwhile {max(lags):.2f} ms")

    asyncio.run(main())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--quick", action="store_true", help="1 KB JSON only")
    ap.add_argument("--redis-url", default=None, help="run the budget-on case on this Redis too")
    ap.add_argument("--budget-rounds", type=int, default=6, help="rounds of the one vs five budgets comparison")
    ap.add_argument("--budgets-only", action="store_true", help="plain Envoy and the one vs five budgets comparison")
    ap.add_argument("--modes-only", action="store_true",
                    help="only the settlement modes compared (plain, ext_proc, envoy: JSON, 40- and 300-event streams)")
    ap.add_argument("--json", metavar="FILE", help="also write every figure to FILE as JSON")
    ap.add_argument("--profile", metavar="FILE", help="only profile the server under 1 KB JSON load with py-spy: an "
                    "SVG flame graph (or speedscope JSON when FILE ends in .json)")
    ap.add_argument("--profile-mode", default="envoy", choices=["ext_proc", "envoy"],
                    help="the settlement mode to profile (default envoy)")
    args = ap.parse_args()
    figures: dict[str, object] = {"machine": {"cores": os.cpu_count()}, "cases": [], "ratios": {}}
    b = Bench(args)
    body_1k, body_100k = chat_body(1024), chat_body(100 * 1024)
    try:
        if args.profile:
            profile(b, b.start_upstream(), args.profile, args.profile_mode)
            return 0
        if args.modes_only:
            b.stack.start_fakes(("openai",))
            figures["modes"] = compare_settlement_modes(b, b.stack.fake_ports["openai"], b.start_upstream())
            if args.json:
                Path(args.json).write_text(json.dumps(figures, indent=2))
            return 0
        up = b.start_upstream()
        print(f"machine: {os.cpu_count()} cores; wrk -t2; Envoy --concurrency 2; upstream: Envoy direct_response",
              flush=True)
        pe, pport, _ = b.start_envoy(plain_config(free_port(), free_port(), up), "plain")
        x1, g1 = b.start_extproc(None, 1)
        params = EnvoyParams(listen_address=HOST, listen_port=free_port(), admin_port=free_port(),
                             extproc_ports=[g1], upstreams=[Upstream("openai", HOST, up)], access_log_path="/dev/null")
        ee, eport, eadmin = b.start_envoy(build_config(params), "ext1")

        print("\n1 KB prompt, JSON, 16 connections")
        plain = b.measure("plain Envoy", pport, pe, None, body_1k, 16)
        if args.budgets_only:
            compare_budget_counts(b, up, body_1k, plain, [])
            return 0
        ext = b.measure("Envoy + ext_proc (1 worker)", eport, ee, x1, body_1k, 16)
        ratios = [("1 KB JSON c=16, 1 worker", ext.rps / plain.rps)]
        msgs_per_req = messages_per_request(eport, eadmin, body_1k)
        print(f"  ext_proc messages per request: {msgs_per_req:.2f}")
        figures["messages_per_json_request"] = round(msgs_per_req, 2)

        # The lever this design pulls: the same server behind the four-exchange Envoy config (response
        # headers sent), measured in the same run.
        p4 = EnvoyParams(listen_address=HOST, listen_port=free_port(), admin_port=free_port(), extproc_ports=[g1],
                         upstreams=[Upstream("openai", HOST, up)], access_log_path="/dev/null",
                         skip_response_headers=False)
        e4, e4port, e4admin = b.start_envoy(build_config(p4), "ext1-four")
        ext4 = b.measure("Envoy + ext_proc, 4 exchanges", e4port, e4, x1, body_1k, 16)
        m4 = messages_per_request(e4port, e4admin, body_1k)
        print(f"  four-exchange config: {m4:.2f} messages per request; three vs four: "
              f"{ext.extproc_cpu_us - ext4.extproc_cpu_us:+.0f} µs ext_proc CPU, "
              f"{ext.envoy_cpu_us - ext4.envoy_cpu_us:+.0f} µs Envoy CPU per request")
        figures["four_exchange"] = {"messages_per_request": round(m4, 2), "rps": ext4.rps,
                                    "extproc_cpu_us": ext4.extproc_cpu_us, "envoy_cpu_us": ext4.envoy_cpu_us}
        ratios.append(("1 KB JSON c=16, 4 exchanges", ext4.rps / plain.rps))

        # The floor: a null grpc.aio processor (bench/null_extproc.py) behind the same config; the client
        # names the cluster itself since the null server routes nothing.
        null_port = free_port()
        nx = b.stack._spawn([sys.executable, str(ROOT / "bench" / "null_extproc.py"), str(null_port)], "null")
        time.sleep(1.5)
        pn = EnvoyParams(listen_address=HOST, listen_port=free_port(), admin_port=free_port(),
                         extproc_ports=[null_port], upstreams=[Upstream("openai", HOST, up)],
                         access_log_path="/dev/null")
        en, enport, _ = b.start_envoy(build_config(pn), "null")
        null = b.measure("Envoy + null ext_proc (floor)", enport, en, nx, body_1k, 16, {"x-nexus-upstream": "openai"})
        print(f"  ours above the null processor's floor: {ext.extproc_cpu_us - null.extproc_cpu_us:+.0f} µs "
              f"CPU per request ({(ext.extproc_cpu_us - null.extproc_cpu_us) / max(msgs_per_req, 1):.0f} µs per "
              f"message)")
        figures["null_floor_extproc_cpu_us"] = null.extproc_cpu_us
        figures["ours_above_floor_us"] = ext.extproc_cpu_us - null.extproc_cpu_us

        x2, g2 = b.start_extproc(None, 2)
        params2 = EnvoyParams(listen_address=HOST, listen_port=free_port(), admin_port=free_port(),
                              extproc_ports=[g2, g2 + 1], upstreams=[Upstream("openai", HOST, up)],
                              access_log_path="/dev/null")
        ee2, eport2, _ = b.start_envoy(build_config(params2), "ext2")
        ext2 = b.measure("Envoy + ext_proc (2 workers)", eport2, ee2, x2, body_1k, 16)

        # Envoy -> ext_proc over a Unix socket instead of TCP loopback, same server build, same run.
        sock = str(b.work / "extproc.sock")
        xu, _ = b.start_extproc(None, 1, uds=sock)
        pu = EnvoyParams(listen_address=HOST, listen_port=free_port(), admin_port=free_port(), extproc_uds=[sock],
                         upstreams=[Upstream("openai", HOST, up)], access_log_path="/dev/null")
        eu, euport, _ = b.start_envoy(build_config(pu), "ext-uds")
        uds = b.measure("Envoy + ext_proc over a Unix socket", euport, eu, xu, body_1k, 16)
        print(f"  Unix socket vs TCP: {uds.rps / max(ext.rps, 1):.3f}x req/s, "
              f"{uds.extproc_cpu_us - ext.extproc_cpu_us:+.0f} µs ext_proc, "
              f"{uds.envoy_cpu_us - ext.envoy_cpu_us:+.0f} µs Envoy CPU per request")
        ratios.append(("1 KB JSON c=16, Unix socket", uds.rps / plain.rps))
        figures["uds_vs_tcp"] = {"rps_ratio": uds.rps / max(ext.rps, 1),
                                 "extproc_cpu_us": uds.extproc_cpu_us - ext.extproc_cpu_us,
                                 "envoy_cpu_us": uds.envoy_cpu_us - ext.envoy_cpu_us}
        ratios.append(("1 KB JSON c=16, 2 workers", ext2.rps / plain.rps))

        if not args.quick:
            print("\nBudget on (ledger reserve + settle per request), 1 KB JSON, 16 connections, 1 worker")
            stores = [("sqlite", {"kind": "sqlite", "path": str(b.work / "bench.db")})]
            if args.redis_url or shutil.which("redis-server"):
                url = args.redis_url
                if url is None:
                    rport = free_port()
                    b.stack._spawn(["redis-server", "--port", str(rport), "--bind", HOST, "--save", "",
                                    "--appendonly", "no"], "redis")
                    time.sleep(0.5)
                    url = f"redis://{HOST}:{rport}/0"
                stores.append(("redis", {"kind": "redis", "url": url, "key_prefix": "bench"}))
            for sname, store in stores:
                xb, gb = b.start_extproc(store, 1)
                pb = EnvoyParams(listen_address=HOST, listen_port=free_port(), admin_port=free_port(),
                                 extproc_ports=[gb], upstreams=[Upstream("openai", HOST, up)],
                                 access_log_path="/dev/null")
                eb, ebport, _ = b.start_envoy(build_config(pb), f"budget-{sname}")
                r = b.measure(f"Envoy + ext_proc + {sname} ledger", ebport, eb, xb, body_1k, 16)
                print(f"    ledger cost vs request path only: {r.extproc_cpu_us - ext.extproc_cpu_us:+.0f} µs "
                      f"CPU/req; {r.rps / plain.rps:.3f}× plain Envoy")
                ratios.append((f"1 KB JSON c=16, budget on ({sname})", r.rps / plain.rps))
                if sname == "sqlite":
                    compare_budget_counts(b, up, body_1k, plain, ratios)

            print("\n100 KB prompt, JSON, 64 connections")
            plain100 = b.measure("plain Envoy", pport, pe, None, body_100k, 64)
            ext100 = b.measure("Envoy + ext_proc (2 workers)", eport2, ee2, x2, body_100k, 64)
            ratios.append(("100 KB JSON c=64, 2 workers", ext100.rps / plain100.rps))

            print("\nSSE (20 events + usage in one upstream write), 1 KB prompt, 16 connections")
            sse = chat_body(1024, stream=True)
            plain_sse = b.measure("plain Envoy", pport, pe, None, sse, 16, {"x-bench-stream": "1"})
            m1 = envoy_stat(eadmin, "ext_proc.stream_msgs_received")
            ext_sse = b.measure("Envoy + ext_proc (1 worker)", eport, ee, x1, sse, 16, {"x-bench-stream": "1"})
            ratios.append(("SSE 1 KB c=16, 1 worker", ext_sse.rps / plain_sse.rps))

            print("\nStreamed chunks: Python fake upstream, 40 events 2 ms apart (each its own chunk), 8 connections")
            b.stack.start_fakes(("openai",))
            fake = b.stack.fake_ports["openai"]
            pf, pfport, _ = b.start_envoy(plain_config(free_port(), free_port(), fake), "plain-fake")
            pfx = EnvoyParams(listen_address=HOST, listen_port=free_port(), admin_port=free_port(),
                              extproc_ports=[g1], upstreams=[Upstream("openai", HOST, fake)],
                              access_log_path="/dev/null")
            ef, efport, efadmin = b.start_envoy(build_config(pfx), "ext-fake")
            sse40 = json.dumps({"model": "gpt-4o-mini", "stream": True, "max_tokens": 40,
                                "messages": [{"role": "user", "content": "hi"}]})
            paced = {"x-fake-completion-tokens": "40", "x-fake-delay-ms": "2"}
            run_wrk(b.wrk, f"http://{HOST}:{efport}/v1/chat/completions", sse40, 8, 1, paced, b.work)  # warm-up
            before_msgs = envoy_stat(efadmin, "ext_proc.stream_msgs_received")
            x_before = cpu_seconds(children_of(x1.pid))
            _, _, _, _, total = run_wrk(b.wrk, f"http://{HOST}:{efport}/v1/chat/completions", sse40, 8,
                                        b.args.duration, paced, b.work)
            msgs = envoy_stat(efadmin, "ext_proc.stream_msgs_received") - before_msgs
            x_cpu_us = (cpu_seconds(children_of(x1.pid)) - x_before) * 1e6
            base = round(msgs_per_req)  # the messages of a JSON request; every one beyond is a streamed chunk
            chunks = msgs - base * total
            per_chunk = (x_cpu_us - total * ext.extproc_cpu_us) / max(1, chunks)
            print(f"    {total} streamed responses, {msgs / max(1, total):.1f} ext_proc messages each; "
                  f"ext_proc CPU {x_cpu_us / max(1, total):.0f} µs per response, ≈{per_chunk:.0f} µs per streamed "
                  f"chunk beyond the {base}-message JSON request's {ext.extproc_cpu_us:.0f} µs")
            figures["stream"] = {"messages_per_response": round(msgs / max(1, total), 1),
                                 "extproc_cpu_us_per_chunk": round(per_chunk)}
            t_plain = asyncio.run(ttft(f"http://{HOST}:{pfport}/v1/chat/completions", sse40, 40))
            t_ext = asyncio.run(ttft(f"http://{HOST}:{efport}/v1/chat/completions", sse40, 40))
            print(f"    time to first token (median of 40, sequential): plain {t_plain:.2f} ms, "
                  f"ext_proc {t_ext:.2f} ms, difference {t_ext - t_plain:+.2f} ms")
            figures["ttft_ms"] = {"plain": t_plain, "ext_proc": t_ext, "added": t_ext - t_plain}
            del m1
            figures["modes"] = compare_settlement_modes(b, fake, up)

        print("\nIn-process request path")
        micro_benchmarks()

        print("\nRatios (Envoy + ext_proc req/s ÷ plain Envoy req/s, same run)")
        for name, ratio in ratios:
            print(f"  {name:<40} {ratio:.3f}×")
        if args.json:
            figures["cases"] = [r.__dict__ for r in b.results]
            figures["ratios"] = {name: round(ratio, 4) for name, ratio in ratios}
            Path(args.json).write_text(json.dumps(figures, indent=2))
            print(f"figures written to {args.json}")
        return 0
    finally:
        b.stack.stop()


if __name__ == "__main__":
    raise SystemExit(main())
