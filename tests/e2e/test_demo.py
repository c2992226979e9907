"""The demo as `make up` runs it (python -m nexus_dev): a clean stop logs no error, --fresh starts from an empty
ledger, a taken port gets one line naming its flag, and kill -9 of the demo leaves no process behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from nexus_dev.stack import REPO, free_port

pytestmark = pytest.mark.e2e
BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5}


def descendants(pid: int) -> set[int]:
    parents: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            parents[int(d)] = int(stat.rsplit(")", 1)[1].split()[1])
    out: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {c for c, p in parents.items() if p in frontier} - out
        out |= frontier
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Demo:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ports = {flag: free_port() for flag in ("--port", "--admin-port", "--grpc-port", "--envoy-admin-port",
                                                      "--admin-api-port")}
        self.config = tmp / "demo.yaml"
        self.config.write_text((REPO / "examples" / "demo.yaml").read_text())  # its ledger: ./nexus-demo-ledger.db
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tmp / "demo.out"

    def start(self, *extra: str) -> subprocess.Popen[bytes]:
        args = [sys.executable, "-m", "nexus_dev", "--config", str(self.config), *extra]
        for flag, port in self.ports.items():
            args += [flag, str(port)]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        out = open(self.log, "wb")
        self.proc = subprocess.Popen(args, cwd=self.tmp, stdout=out, stderr=subprocess.STDOUT, env=env)
        end = time.monotonic() + 60
        while b"demo is up" not in self.log.read_bytes():
            assert self.proc.poll() is None, self.log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < end, "the demo did not come up in 60 s"
            time.sleep(0.2)
        return self.proc

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['--port']}"

    def spent(self) -> float:
        stats = httpx.get(f"http://127.0.0.1:{self.ports['--admin-port']}/v1/stats", timeout=5).json()
        return float(stats["budget"]["current_spending_usd"])

    def interrupt(self) -> str:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        assert self.proc.wait(60) == 0
        return self.log.read_text(errors="replace")


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Demo]:
    d = Demo(tmp_path)
    yield d
    if d.proc is not None and d.proc.poll() is None:
        kids = descendants(d.proc.pid)
        d.proc.kill()
        for k in kids:
            with __import__("contextlib").suppress(ProcessLookupError):
                os.kill(k, signal.SIGKILL)


def test_two_runs_in_a_row_and_fresh_start_from_empty_with_a_clean_stop(demo: Demo):
    demo.start("--fresh")
    assert httpx.post(demo.url + "/v1/chat/completions", json=BODY, timeout=10).status_code == 200
    time.sleep(0.3)
    first = demo.spent()
    out = demo.interrupt()
    assert first > 0
    assert f"ledger                {demo.tmp / 'nexus-demo-ledger.db'}" in out
    for bad in (" ERROR ", "ERROR:", "Traceback", "exception was never retrieved"):
        assert bad not in out, out[-4000:]
    demo.start()  # spend carries over without --fresh
    assert demo.spent() == first
    demo.interrupt()
    demo.start("--fresh")
    assert demo.spent() == 0
    demo.interrupt()


def test_kill_9_of_the_demo_leaves_no_process_behind(demo: Demo):
    proc = demo.start("--fresh")
    kids = descendants(proc.pid)
    assert len(kids) >= 3, kids  # fakes, ext_proc, Envoy
    proc.kill()
    proc.wait(10)
    end = time.monotonic() + 15
    while any(alive(k) for k in kids) and time.monotonic() < end:
        time.sleep(0.2)
    left = [k for k in kids if alive(k)]
    assert not left, f"still running after kill -9 of the demo: {left}"
    # and its ports are free again (TIME_WAIT aside, as the servers bind), so the next `make up` starts
    for port in demo.ports.values():
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))


def test_a_taken_port_gets_one_line_naming_its_flag(demo: Demo):
    with socket.socket() as s:
        s.bind(("127.0.0.1", demo.ports["--grpc-port"]))
        s.listen()
        args = [sys.executable, "-m", "nexus_dev", "--config", str(demo.config)]
        for flag, port in demo.ports.items():
            args += [flag, str(port)]
        r = subprocess.run(args, cwd=demo.tmp, capture_output=True, text=True, timeout=60,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(demo.ports["--grpc-port"]) in lines[0] and "--grpc-port" in lines[0], r.stderr
