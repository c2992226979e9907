"""Issue 27 item 6: a request admitted as asked costs one ledger write on the request path. Its reservation is
written already marked forwarded; a reroute still marks the replacing reservation afterwards."""

from __future__ import annotations

import asyncio
import sqlite3
import time

from nexus_extproc.app import build
from nexus_extproc.budget.policy import Target
from nexus_extproc.ledger import SpendRecord
from tests.builders import admitted_state
from tests.conftest import make_config


def _processor(counter, tmp_path, **budget):
    # The local equivalent has a price here, so its reservation is one the reaper would charge.
    cfg = make_config(budget={"monthly_limit_usd": 100, **budget},
                      store={"kind": "sqlite", "path": str(tmp_path / "l.db")},
                      prices={"llama3.1:8b": {"input_per_mtok": 0.1, "output_per_mtok": 0.1}})
    return build(cfg, counter).processor


def _spy(proc) -> list[str]:
    calls: list[str] = []
    ledger = proc.budget.ledger
    for name in ("reserve", "mark_forwarded", "settle", "release"):
        real = getattr(ledger, name)

        async def wrapped(*a, _real=real, _name=name, **kw):
            calls.append(_name)
            return await _real(*a, **kw)
        setattr(ledger, name, wrapped)
    return calls


def test_admitted_as_asked_is_one_write_marked_forwarded(counter, tmp_path):
    async def go():
        proc = _processor(counter, tmp_path)
        calls = _spy(proc)
        st = await admitted_state(proc, "/v1/chat/completions", "gpt-4o", respond=False)
        assert calls == ["reserve"]
        assert st.admission is not None and st.admission.forward_marked and st.forwarded
        row = sqlite3.connect(tmp_path / "l.db").execute(
            "SELECT forwarded_at, note FROM reservations WHERE req_id=?", (st.req_id,)).fetchone()
        assert row is not None and row[0] is not None and row[1].startswith("gpt-4o\t")
    asyncio.run(go())


def test_a_reroute_marks_the_replacing_reservation(counter, tmp_path):
    async def go():
        proc = _processor(counter, tmp_path, monthly_limit_usd=0.01, soft_limit_percent=10)
        adm = await proc.budget.admit("seed", Target("openai", "cloud", "gpt-4o-mini", 5000), None)
        await proc.budget.settle("seed", adm, 5000, SpendRecord(time.time(), "gpt-4o-mini", "openai", 1, 1, 5000,
                                                                "usage"))
        calls = _spy(proc)  # half the budget spent, past its soft limit: gpt-4o-mini goes to its local equivalent
        st = await admitted_state(proc, "/v1/chat/completions", "gpt-4o-mini", respond=False)
        assert st.route is not None and st.route.backend_type == "local", st.route
        assert st.admission is not None and not st.admission.forward_marked
        # reserve as asked (marked), release it, reserve the local model's estimate, mark that one forwarded
        assert calls == ["reserve", "release", "reserve", "mark_forwarded"]
        row = sqlite3.connect(tmp_path / "l.db").execute(
            "SELECT forwarded_at FROM reservations WHERE req_id=?", (st.req_id,)).fetchone()
        assert row is not None and row[0] is not None
    asyncio.run(go())
