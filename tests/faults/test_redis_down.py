"""Redis killed with -9 under traffic, and started again, through the real Envoy, in both store_failure
modes: `closed` refuses with 503 while it is gone, `open` admits and keeps the settlements in the outbox;
after it is back every answered request is in the ledger. Redis runs with an fsync'd append-only file, as a
production store would, so its own restart loses nothing."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from nexus_dev.stack import free_port
from nexus_extproc.ledger import open_ledger
from tests.conftest import start_redis
from tests.faults.conftest import E2E, post, send_threads, wait_for

BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 20}


class Redis:
    def __init__(self, d: Path) -> None:
        self.dir, self.port = d, free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = start_redis(self.port, self.dir, "--appendonly", "yes", "--appendfsync", "always")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def settlements(self) -> int:
        async def read() -> int:
            led = open_ledger("redis", url=self.url, timeout_ms=2000)
            try:
                return await led.settlement_count()
            finally:
                await led.close()

        return asyncio.run(read())


@pytest.mark.parametrize("mode", ["closed", "open"])
def test_redis_killed_and_back(e2e: E2E, tmp_path: Path, mode: str):
    r = Redis(tmp_path)
    r.start()
    try:
        e2e.restart(budget={"monthly_limit_usd": 1000, "reconciliation_interval_secs": 1}, store_failure=mode,
                    store={"kind": "redis", "url": r.url, "timeout_ms": 200,
                           "outbox_path": str(tmp_path / "outbox.jsonl")})
        one = lambda i: post(e2e.url, "/v1/chat/completions", BODY)  # noqa: E731
        up = send_threads(40, one)
        assert up == [200] * 40
        wait_for(lambda: r.settlements() >= 40, 10, "40 settlements")
        r.kill()
        down = send_threads(40, one)
        assert not [s for s in down if s >= 500 and s != 503], down
        assert set(down) == ({503} if mode == "closed" else {200}), down
        r.start()
        tries: list[list[int]] = []
        wait_for(lambda: tries.append(send_threads(20, one)) or tries[-1] == [200] * 20, 20,
                 "the service to answer again once Redis was back")
        answered = 40 + down.count(200) + sum(t.count(200) for t in tries)
        count = wait_for(lambda: (lambda c: c if c >= answered else None)(r.settlements()), 20,
                         f"{answered} settlements")
        assert count == answered
        print(f"redis kill -9, store_failure={mode}: {down.count(200)} answered and {down.count(503)} refused "
              f"while down; {count} of {answered} answered requests settled after it was back")
    finally:
        if r.proc is not None and r.proc.poll() is None:
            r.proc.terminate()
            r.proc.wait(10)
