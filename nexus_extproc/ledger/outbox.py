"""Settlements that could not reach the store, kept on local disk until it is back.

Each line is `<crc32 hex> <json>`: a line torn by kill -9 or a full disk fails its checksum and is moved
aside to `<outbox>.corrupt` for an operator, while the lines around it still replay. A replay claims the file
by renaming it to `<outbox>.replay-<pid>`; a claim left by a process that died is picked up by the next pass.
When the disk refuses the append, the settlement waits in a bounded in-memory list that each pass retries.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nexus_extproc.ledger.base import Ledger, SpendRecord, StoreUnavailable
from nexus_extproc.ops import metrics

log = logging.getLogger(__name__)

MAX_PENDING = 100_000  # settlements held in memory while the disk refuses them (~300 B each)


def encode(entry: dict[str, Any]) -> bytes:
    body = json.dumps(entry, separators=(",", ":")).encode()
    return b"%08x %s\n" % (zlib.crc32(body), body)


def decode(line: bytes) -> dict[str, Any] | None:
    """One line's entry, or None when it is torn or altered. Lines from before checksums are plain JSON."""
    line = line.rstrip(b"\n")
    if line.startswith(b"{"):
        body = line
    else:
        crc, _, body = line.partition(b" ")
        if len(crc) != 8 or not body:
            return None
        try:
            if int(crc, 16) != zlib.crc32(body):
                return None
        except ValueError:
            return None
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict) or not {"req_id", "items", "cost", "record"} <= doc.keys():
        return None
    return doc


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Outbox:
    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.pending: list[dict[str, Any]] = []
        self.dropped = 0

    @property
    def corrupt_path(self) -> Path:
        return self.path.with_name(self.path.name + ".corrupt")

    def append(self, entry: dict[str, Any]) -> bool:
        """Durably record one settlement; False when it is only held in memory (the disk refused it)."""
        try:
            self._write([encode(entry)])
            return True
        except OSError as e:
            metrics.outbox_failures.inc()
            if len(self.pending) >= MAX_PENDING:
                self.dropped += 1
                metrics.unmetered.inc()
                log.error("outbox unwritable and its memory queue is full: a settlement is lost",
                          extra={"error": e.strerror, "pending": len(self.pending)})
            else:
                self.pending.append(entry)
                log.error("outbox unwritable; settlement held in memory until the disk or store is back",
                          extra={"error": e.strerror, "pending": len(self.pending)})
            metrics.settlements_pending.set(len(self.pending))
            return False

    def _write(self, lines: list[bytes]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a+b") as f:
            # A line torn by an earlier crash has no newline: start on a fresh line so only it is lost.
            end = f.seek(0, os.SEEK_END)
            if end:
                f.seek(end - 1)
                if f.read(1) != b"\n":
                    lines = [b"\n", *lines]
            f.write(b"".join(lines))
            f.flush()
            os.fsync(f.fileno())

    def _claims(self) -> Iterator[Path]:
        """Our own claim first, then claims whose process is gone, then the live file."""
        mine = self.path.with_name(f"{self.path.name}.replay-{os.getpid()}")
        if mine.exists():
            yield mine
        for p in sorted(self.path.parent.glob(self.path.name + ".replay-*")):
            pid = p.name.rsplit("-", 1)[-1]
            if p != mine and pid.isdigit() and not _pid_alive(int(pid)):
                taken = p.with_name(f"{self.path.name}.replay-{os.getpid()}")
                try:
                    os.replace(p, taken)  # one process adopts a dead one's claim
                except FileNotFoundError:
                    continue
                yield taken
        if self.path.exists():
            try:
                os.replace(self.path, mine)  # atomic claim: one process replays a given batch
            except FileNotFoundError:
                return
            yield mine

    async def replay(self, ledger: Ledger) -> int:
        """Settle everything waiting; stops at the first store failure and keeps the rest."""
        done = 0
        while self.pending:
            await _settle(ledger, self.pending[0])  # StoreUnavailable propagates: they stay in memory
            self.pending.pop(0)
            done += 1
        metrics.settlements_pending.set(0)
        for claim in self._claims():
            lines = claim.read_bytes().splitlines(keepends=True)
            corrupt: list[bytes] = []
            rest: list[bytes] = []
            for i, line in enumerate(lines):
                if not line.strip():
                    continue
                entry = decode(line)
                if entry is None:
                    corrupt.append(line if line.endswith(b"\n") else line + b"\n")
                    continue
                try:
                    await _settle(ledger, entry)
                    done += 1
                except StoreUnavailable:
                    rest = [ln for ln in lines[i:] if ln.strip()]
                    break
                except (TypeError, ValueError, KeyError):  # checksummed but not a settlement we can read
                    corrupt.append(line if line.endswith(b"\n") else line + b"\n")
            if corrupt:
                metrics.outbox_corrupt.inc(len(corrupt))
                log.error("outbox lines failed their checksum; moved aside for an operator",
                          extra={"count": len(corrupt), "file": str(self.corrupt_path)})
                with self.corrupt_path.open("ab") as f:
                    f.write(b"".join(corrupt))
            if rest:
                self._write(rest)  # put the rest back; the next pass goes on
                claim.unlink(missing_ok=True)
                raise StoreUnavailable("store went away during the outbox replay")
            claim.unlink(missing_ok=True)
        return done


async def _settle(ledger: Ledger, e: dict[str, Any]) -> None:
    """A settlement, or (`op: correct`) a late report's correction of a settlement made at the estimate; both
    idempotent in the ledger, so a replay cut short and repeated moves nothing twice."""
    rec = SpendRecord(**e["record"])
    items = [tuple(i) for i in e["items"]]
    if e.get("op") == "correct":
        await ledger.correct(str(e["req_id"]), items, int(e["cost"]), rec)
    else:
        await ledger.settle(str(e["req_id"]), items, int(e["cost"]), rec)
