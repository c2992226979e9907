"""The store stalls instead of failing: Redis paused (SIGSTOP) past the client's timeout, and the SQLite
write lock held by another process. Neither may leave a ghost reservation or stall the event loop."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nexus_dev.stack import free_port
from nexus_extproc.ledger import StoreUnavailable, open_ledger
from tests.conftest import start_redis

pytestmark = pytest.mark.faults
KEYS = [("global", "2026-12")]


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A redis-server of this test's own: it is paused, which must not stall any other test."""
    port = free_port()
    proc = start_redis(port, tmp_path)
    try:
        yield f"redis://127.0.0.1:{port}/0", proc
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.terminate()
        proc.wait(10)


async def test_redis_paused_past_the_timeout_leaves_no_ghost_reservation(own_redis):
    url, proc = own_redis
    led = open_ledger("redis", url=url, timeout_ms=200)
    assert (await led.reserve("warm", KEYS, 10, time.time() + 60)).admitted
    await led.release("warm")
    proc.send_signal(signal.SIGSTOP)
    try:
        for i in range(5):
            with pytest.raises(StoreUnavailable):
                await led.reserve(f"r{i}", KEYS, 1000, time.time() + 300)
        await asyncio.sleep(0.5)  # well past the deadline the scripts carry
    finally:
        proc.send_signal(signal.SIGCONT)
    await asyncio.sleep(0.5)  # the queued scripts run now, and must refuse themselves
    fresh = open_ledger("redis", url=url, timeout_ms=2000)
    t = await fresh.totals(*KEYS[0])
    assert t.reserved == 0, f"{t.reserved} µ$ held by requests that were already told the store was down"
    assert (await fresh.reserve("after", KEYS, 10, time.time() + 60)).admitted  # and it serves again
    await fresh.close()
    await led.close()


HOLD_LOCK = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
db.execute("COMMIT")
"""


async def test_sqlite_lock_held_elsewhere_fails_fast_and_never_stalls_the_loop(tmp_path):
    db = tmp_path / "l.db"
    led = open_ledger("sqlite", path=str(db), timeout_ms=250)
    assert (await led.reserve("warm", KEYS, 10, time.time() + 60)).admitted
    holder = await asyncio.create_subprocess_exec(sys.executable, "-c", HOLD_LOCK, str(db), "2",
                                                  stdout=asyncio.subprocess.PIPE)
    assert holder.stdout is not None
    assert (await holder.stdout.readline()).strip() == b"locked"

    gaps: list[float] = []

    async def ticker() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    tick = asyncio.create_task(ticker())
    results = await asyncio.gather(*(led.reserve(f"r{i}", KEYS, 1000, time.time() + 60) for i in range(20)),
                                   return_exceptions=True)
    tick.cancel()
    assert all(isinstance(r, StoreUnavailable) for r in results), results
    # 20 calls that each wait for the lock would hold a blocked loop for seconds; ours keeps ticking.
    assert gaps and max(gaps) < 1.0, f"event loop stalled for {max(gaps):.2f} s"
    await holder.wait()
    assert (await led.reserve("after", KEYS, 10, time.time() + 60)).admitted
    assert (await led.totals(*KEYS[0])).reserved == 20
    await led.close()
    print(f"sqlite lock: 20 reserves refused while locked, longest loop gap {max(gaps) * 1000:.0f} ms")
