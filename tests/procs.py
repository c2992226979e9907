"""Processes by their parents, from /proc: what a test kills and what must end with it."""

from __future__ import annotations

import os
from pathlib import Path


def parents() -> dict[int, int]:
    out: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            out[int(d)] = int(stat.rsplit(")", 1)[1].split()[1])
    return out


def children(pid: int) -> list[int]:
    return sorted(c for c, p in parents().items() if p == pid)


def descendants(pid: int) -> set[int]:
    ppids = parents()
    out: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {c for c, p in ppids.items() if p in frontier} - out
        out |= frontier
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
