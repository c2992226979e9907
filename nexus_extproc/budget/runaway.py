"""Runaway detection: an agent retrying all night spends at many times its own usual rate (or its peers'), long
before any calendar budget notices. Each settled request is added to per-value spend series (one per configured
dimension: key, session, agent, tool, ...), in slots of a fifth of the short window; after each, the value's
last window is compared with its own trailing baseline, as a rate, and with the median last window of its
peers (the other values of that dimension). Past `factor` times either, and at least `min_spend_usd`, it is a
finding: alerted once per value and window, and, by `action`, throttled (429) or blocked (403) for `cooldown`.

Pure and in-process: no I/O, the clock is passed in. Each process sees its own share of the traffic; the
window and the baseline shrink together, so their ratio holds, while `min_spend_usd` applies to the share (with
N workers, a value needs about N times it in all). Penalties reach the other processes through the store
(service.py) within a reconcile interval."""

from __future__ import annotations

import statistics
from collections import OrderedDict, deque
from dataclasses import dataclass
from decimal import Decimal

from nexus_extproc.budget.scopes import RequestFacts, safe_value
from nexus_extproc.config import RunawayConfig
from nexus_extproc.metering.money import usd_to_micros
from nexus_extproc.terms import duration_s

SLOTS_PER_WINDOW = 5
MAX_SERIES = 20_000  # values tracked at once (least recently spending dropped first)


@dataclass(frozen=True, slots=True)
class Finding:
    dim: str
    value: str
    window_micros: int  # spend in the last window
    baseline_micros: int  # its own usual spend per window (0: no history yet)
    peers_micros: int  # the median last window of its peers (0: too few peers)
    factor: Decimal
    action: str
    window_s: int

    def doc(self) -> dict[str, object]:
        return {"dimension": self.dim, "value": safe_value(self.value), "window_secs": self.window_s,
                "window_spend_micros": self.window_micros, "baseline_per_window_micros": self.baseline_micros,
                "peers_median_micros": self.peers_micros, "factor": str(self.factor), "action": self.action}


def value_of(facts: RequestFacts, dim: str) -> str | None:
    v = facts.api_key_hash if dim == "api_key" else getattr(facts, dim, None)
    return v or None


class _Series:
    __slots__ = ("first_slot", "slots")

    def __init__(self, slot: int) -> None:
        self.first_slot = slot
        self.slots: deque[list[int]] = deque()  # [slot index, micros], oldest first


class Detector:
    def __init__(self, config: RunawayConfig) -> None:
        self.config = config
        self.window_s = duration_s(config.window)
        self.slot_s = max(1, self.window_s // SLOTS_PER_WINDOW)
        self.baseline_slots = max(1, duration_s(config.baseline) // self.slot_s)
        self.min_micros = usd_to_micros(config.min_spend_usd)
        self.cooldown_s = duration_s(config.cooldown)
        self._series: dict[str, OrderedDict[str, _Series]] = {d: OrderedDict() for d in config.by}
        self._peers: dict[str, tuple[int, int]] = {}  # dim -> (slot it was computed in, median window)
        self._flagged: dict[tuple[str, str], int] = {}  # (dim, value) -> the window index it was found in
        # (dim, value) -> unix seconds until which its requests are refused (throttle / block); shared through
        # the store by the service, so every process refuses them.
        self.penalties: dict[tuple[str, str], float] = {}

    def observe(self, facts: RequestFacts, micros: int, now: float) -> list[Finding]:
        if micros <= 0:
            return []
        slot = int(now) // self.slot_s
        out = []
        for dim, series in self._series.items():
            value = value_of(facts, dim)
            if value is None:
                continue
            s = series.get(value)
            if s is None:
                if len(series) >= MAX_SERIES:
                    series.popitem(last=False)
                s = series[value] = _Series(slot)
            else:
                series.move_to_end(value)
            if s.slots and s.slots[-1][0] == slot:
                s.slots[-1][1] += micros
            else:
                s.slots.append([slot, micros])
            horizon = slot - SLOTS_PER_WINDOW - self.baseline_slots
            while s.slots[0][0] <= horizon:
                s.slots.popleft()
            f = self._check(dim, value, s, slot, now)
            if f is not None:
                out.append(f)
        return out

    def _check(self, dim: str, value: str, s: _Series, slot: int, now: float) -> Finding | None:
        window = sum(m for i, m in s.slots if i > slot - SLOTS_PER_WINDOW)
        if window < self.min_micros:
            return None
        w_index = int(now) // self.window_s
        if self._flagged.get((dim, value)) in (w_index, w_index - 1):
            return None  # found already in this or the last window: one alert per episode
        # Its own baseline: what it spent per window before this one, over the history it has (at least one
        # baseline's quarter, so a new value's first minutes are compared with its peers only).
        baseline = 0
        history = slot - SLOTS_PER_WINDOW - s.first_slot + 1
        if history >= self.baseline_slots // 4:
            before = sum(m for i, m in s.slots if i <= slot - SLOTS_PER_WINDOW)
            baseline = before * SLOTS_PER_WINDOW // max(1, min(history, self.baseline_slots))
        peers = self._peer_median(dim, value, slot)
        factor = self.config.factor
        own = history >= self.baseline_slots // 4 and window > factor * max(baseline, 1)
        crowd = peers > 0 and window > factor * peers
        if not (own or crowd):
            return None
        self._flagged[(dim, value)] = w_index
        if len(self._flagged) > MAX_SERIES:
            self._flagged.clear()
        if self.config.action != "alert":
            self.penalties[(dim, value)] = now + self.cooldown_s
        return Finding(dim, value, window, baseline, peers, factor, self.config.action, self.window_s)

    def _peer_median(self, dim: str, value: str, slot: int) -> int:
        """The median last-window spend of the other values active in it; recomputed at most once a slot."""
        cached = self._peers.get(dim)
        if cached is not None and cached[0] == slot:
            return cached[1]
        windows = []
        for v, s in self._series[dim].items():
            if v == value or not s.slots or s.slots[-1][0] <= slot - SLOTS_PER_WINDOW:
                continue
            windows.append(sum(m for i, m in s.slots if i > slot - SLOTS_PER_WINDOW))
        median = int(statistics.median(windows)) if len(windows) >= self.config.min_peers else 0
        self._peers[dim] = (slot, median)
        return median

    def penalty(self, facts: RequestFacts, now: float) -> tuple[str, float] | None:
        """(dimension, seconds left) of a penalty on this request's values, if any."""
        for (dim, value), until in list(self.penalties.items()):
            if until <= now:
                del self.penalties[(dim, value)]
            elif value_of(facts, dim) == value:
                return dim, until - now
        return None
