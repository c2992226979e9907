"""`nexus-extproc demo`: fake upstreams + ext_proc + Envoy in the foreground, stopped together on Ctrl-C."""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import sys
import threading
from pathlib import Path

from nexus_dev.stack import REPO, Stack

DEFAULT_CONFIG = REPO / "examples" / "demo.yaml"


def add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="ext_proc config (default examples/demo.yaml)")
    p.add_argument("--port", type=int, default=10000, help="Envoy listener port")
    p.add_argument("--admin-port", type=int, default=9090, help="ext_proc admin HTTP port")
    p.add_argument("--grpc-port", type=int, default=50051, help="ext_proc gRPC port")
    p.add_argument("--envoy-admin-port", type=int, default=9901)
    p.add_argument("--admin-api-port", type=int, default=9091, help="admin gRPC API port")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--fresh", action="store_true",
                   help="start from an empty ledger (delete the demo's ledger file first)")


# The ports the demo binds, with the flag that moves each.
PORT_FLAGS = (("port", "--port", "Envoy listener"), ("admin_port", "--admin-port", "ext_proc admin HTTP"),
              ("grpc_port", "--grpc-port", "ext_proc gRPC"), ("envoy_admin_port", "--envoy-admin-port",
                                                                   "Envoy admin"),
              ("admin_api_port", "--admin-api-port", "admin gRPC API"))


def _bindable(port: int) -> bool:
    """As the servers bind (SO_REUSEADDR): a port left in TIME_WAIT by the last run counts as free, one a
    process listens on does not."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def taken_port(args: argparse.Namespace) -> str | None:
    """One line naming the first port in use and the flag that moves it (an orphaned stack holding the
    ports would otherwise answer `is up` and then fail with a bind traceback)."""
    for attr, flag, what in PORT_FLAGS:
        port = getattr(args, attr)
        ports = range(port, port + args.workers) if attr == "grpc_port" else (port,)
        for p in ports:
            if not _bindable(p):
                return f"python -m nexus_dev: port {p} ({what}) is in use; free it or pick another with {flag} PORT"
    return None


def ledger_path(config: Path) -> Path | None:
    """The SQLite file the demo's config names, relative paths from the working directory as the server
    resolves them."""
    import yaml

    store = (yaml.safe_load(config.read_text()) or {}).get("store") or {}
    if store.get("kind", "sqlite") != "sqlite":
        return None
    return Path(store.get("path", "nexus-ledger.db")).resolve()


def run_demo(args: argparse.Namespace) -> int:
    taken = taken_port(args)
    if taken:
        print(taken, file=sys.stderr)
        return 2
    ledger = ledger_path(Path(args.config))
    if args.fresh and ledger is not None:
        for f in (ledger, ledger.with_name(ledger.name + "-wal"), ledger.with_name(ledger.name + "-shm")):
            f.unlink(missing_ok=True)
    stack = Stack(quiet=False, envoy_port=args.port, admin_port=args.admin_port, grpc_port=args.grpc_port,
                  envoy_admin_port=args.envoy_admin_port, admin_api_port=args.admin_api_port, die_with_parent=True)
    # The admin API needs a token; the demo makes one unless you brought your own.
    token = os.environ.setdefault("NEXUS_ADMIN_TOKEN", secrets.token_urlsafe(16))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        stack.start_fakes(compress=True)  # as the real providers answer their SDKs
        stack.start_extproc(Path(args.config), workers=args.workers)
        stack.start_envoy(workers=args.workers)
        print(f"""
nexus-extproc demo is up.
  send LLM requests to  {stack.base_url}   (OpenAI: /v1/chat/completions …, Anthropic: /v1/messages)
  budget page           http://127.0.0.1:{stack.admin_port}/ui#token={token}
  budget stats          http://127.0.0.1:{stack.admin_port}/v1/stats   (Authorization: Bearer $NEXUS_ADMIN_TOKEN)
  metrics               http://127.0.0.1:{stack.admin_port}/metrics
  fake upstreams        {", ".join(f"{n}=127.0.0.1:{p}" for n, p in stack.fake_ports.items())}
  admin gRPC API        127.0.0.1:{stack.admin_api_port}
                        (.venv/bin/nexus-extproc status | set-limit | spend | forecast | alerts | recommend | export …)
                        export NEXUS_ADMIN_TOKEN={token}
  Envoy access log      {stack.workdir / "access.log"}
  ledger                {ledger or "(not SQLite)"}   ({"started empty" if args.fresh else
                         "spend from earlier runs carries over; --fresh starts empty"})
Ctrl-C stops everything.
""", flush=True)
        while not stop.wait(0.5):
            for p in stack.procs:
                if p.poll() is not None:
                    print(f"a child exited with {p.returncode}; stopping", flush=True)
                    return 1
        return 0
    finally:
        stack.stop()
