"""`nexus-extproc demo`: fake upstreams + ext_proc + Envoy in the foreground, stopped together on Ctrl-C."""

from __future__ import annotations

import argparse
import os
import secrets
import signal
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


def run_demo(args: argparse.Namespace) -> int:
    stack = Stack(quiet=False, envoy_port=args.port, admin_port=args.admin_port, grpc_port=args.grpc_port,
                  envoy_admin_port=args.envoy_admin_port, admin_api_port=args.admin_api_port)
    # The admin API needs a token; the demo makes one unless you brought your own.
    token = os.environ.setdefault("NEXUS_ADMIN_TOKEN", secrets.token_urlsafe(16))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        stack.start_fakes()
        stack.start_extproc(Path(args.config), workers=args.workers)
        stack.start_envoy(workers=args.workers)
        print(f"""
nexus-extproc demo is up.
  send LLM requests to  {stack.base_url}   (OpenAI: /v1/chat/completions …, Anthropic: /v1/messages)
  budget stats          http://127.0.0.1:{stack.admin_port}/v1/stats
  metrics               http://127.0.0.1:{stack.admin_port}/metrics
  fake upstreams        {", ".join(f"{n}=127.0.0.1:{p}" for n, p in stack.fake_ports.items())}
  admin gRPC API        127.0.0.1:{stack.admin_api_port}   (nexus-extproc status | set-limit | override | spend)
                        export NEXUS_ADMIN_TOKEN={token}
  Envoy access log      {stack.workdir / "access.log"}
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
