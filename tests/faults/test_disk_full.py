"""A full disk under the store and the outbox, on a real 4 MB tmpfs: requests keep their answer by the
store_failure rule while it is full, nothing forwarded is lost, and the service recovers by itself once
space is freed (the WAL is cut back instead of holding the volume)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.conftest import E2E, ledger_spend, post, send_threads, wait_for

BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 20}
WAL_MAX = 1 << 20


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[Path]:
    vol = tmp_path / "vol"
    vol.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(vol)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {r.stderr.decode().strip()}")
    try:
        yield vol
    finally:
        subprocess.run(["umount", "-l", str(vol)], check=False)


def fill(vol: Path) -> Path:
    """Take every free byte of the volume."""
    filler = vol / "filler"
    with filler.open("wb", buffering=0) as f:
        for size in (1 << 16, 4096, 512, 1):  # down to the last byte
            with contextlib.suppress(OSError):
                while f.write(b"\0" * size):
                    pass
    return filler


def wal_size(db: Path) -> int:
    try:
        return os.path.getsize(str(db) + "-wal")
    except OSError:
        return 0


@pytest.mark.parametrize("mode", ["open", "closed"])
def test_full_disk_loses_nothing_and_recovers(e2e: E2E, volume: Path, mode: str):
    db = volume / "ledger.db"
    e2e.restart(budget={"monthly_limit_usd": 1000, "reconciliation_interval_secs": 1}, store_failure=mode,
                store={"kind": "sqlite", "path": str(db), "outbox_path": str(volume / "outbox.jsonl"),
                       "wal_max_bytes": WAL_MAX, "timeout_ms": 500})
    ok = 0

    def one(i: int) -> int:
        return post(e2e.url, "/v1/chat/completions", BODY)

    # Healthy: the WAL stays under its bound however many requests go through.
    before = send_threads(300, one)
    assert set(before) == {200}, before
    ok += len(before)
    wait_for(lambda: ledger_spend(db)[1] >= ok, 15, "the first settlements")
    assert wal_size(db) <= WAL_MAX + (1 << 20), wal_size(db)

    filler = fill(volume)
    full = send_threads(60, one)
    assert not [s for s in full if s >= 500 and s != 503], full
    if mode == "open":
        assert set(full) == {200}, full  # admitted; settlements wait in memory or in the outbox
    ok += full.count(200)
    refused = full.count(503)

    filler.unlink()
    # Recovery: the next requests are answered again, and every answered one ends up in the ledger.
    tries: list[list[int]] = []
    wait_for(lambda: tries.append(send_threads(20, one)) or tries[-1] == [200] * 20, 20,
             "the service to answer again once space was freed")
    ok += sum(t.count(200) for t in tries)
    aggs, count = wait_for(lambda: (lambda a: a if a[1] >= ok else None)(ledger_spend(db)), 20,
                           f"{ok} settlements")
    assert count == ok
    assert sum(a.requests for a in aggs if a.budget == "global") == ok
    assert 'nexus_settlements_pending 0.0' in e2e.metrics()
    print(f"disk full, store_failure={mode}: {full.count(200)} answered and {refused} refused while full; "
          f"{count} of {ok} answered requests settled after space was freed; WAL {wal_size(db)} B")
