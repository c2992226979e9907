"""The demo as `make up` runs it (python -m nexus_dev): a clean stop logs no error, --fresh starts from an empty
ledger, a taken port gets one line naming its flag, and kill -9 of the demo leaves no process behind."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from nexus_dev.stack import REPO
from tests.e2e.demo_proc import Demo, alive, descendants

pytestmark = pytest.mark.e2e
BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5}


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Demo]:
    d = Demo(tmp_path)
    yield d
    d.kill()


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
