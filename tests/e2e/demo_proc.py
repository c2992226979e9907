"""The demo as `make up` starts it (python -m nexus_dev), as a process the tests drive."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from nexus_dev.stack import REPO, admin_headers, free_port
from tests.procs import alive, descendants

__all__ = ["Demo", "alive", "descendants"]


class Demo:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ports = {flag: free_port() for flag in ("--port", "--admin-port", "--grpc-port", "--envoy-admin-port",
                                                      "--admin-api-port")}
        self.config = tmp / "demo.yaml"
        self.config.write_text((REPO / "examples" / "demo.yaml").read_text())  # its ledger: ./nexus-demo-ledger.db
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tmp / "demo.out"
        self.token: str | None = None  # the admin token the demo printed (it makes one unless given)

    def start(self, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        args = [sys.executable, "-m", "nexus_dev", "--config", str(self.config), *extra]
        for flag, port in self.ports.items():
            args += [flag, str(port)]
        full = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        full.pop("PROMETHEUS_MULTIPROC_DIR", None)
        out = open(self.log, "wb")
        self.proc = subprocess.Popen(args, cwd=self.tmp, stdout=out, stderr=subprocess.STDOUT, env=full)
        end = time.monotonic() + 60
        while b"demo is up" not in self.log.read_bytes():
            assert self.proc.poll() is None, self.log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < end, "the demo did not come up in 60 s"
            time.sleep(0.2)
        m = re.search(rb"export NEXUS_ADMIN_TOKEN=(\S+)", self.log.read_bytes())
        self.token = m.group(1).decode() if m else None
        return self.proc

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['--port']}"

    def spent(self) -> float:
        stats = httpx.get(f"http://127.0.0.1:{self.ports['--admin-port']}/v1/stats", timeout=5,
                          headers=admin_headers(self.token)).json()
        return float(stats["budget"]["current_spending_usd"])

    def interrupt(self) -> str:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        assert self.proc.wait(60) == 0
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        """Teardown: the demo and whatever it started, however far it got."""
        if self.proc is None or self.proc.poll() is not None:
            return
        kids = descendants(self.proc.pid)
        self.proc.kill()
        self.proc.wait(10)
        for k in kids:
            try:
                os.kill(k, signal.SIGKILL)
            except ProcessLookupError:
                pass
