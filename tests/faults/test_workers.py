"""One of two workers killed with -9 under load: the parent keeps the other serving, starts the dead one
again on its port, and Envoy stops sending to it while it is gone."""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from nexus_dev.stack import Stack
from tests.faults.conftest import ledger_spend, post, send_threads, wait_for, write_config
from tests.procs import alive, children

BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 20}


def start(tmp_path: Path, **server: object) -> tuple[Stack, Path]:
    s = Stack()
    try:
        s.start_fakes()
        s.fake_ports["vllm"] = s.port()
        db = tmp_path / "ledger.db"
        cfg = write_config(s.workdir / "workers.yaml",
                           budget={"monthly_limit_usd": 1000, "reconciliation_interval_secs": 1},
                           store={"kind": "sqlite", "path": str(db), "outbox_path": str(tmp_path / "ob.jsonl"),
                                  "reservation_ttl_secs": 5},
                           server={"grace_period_secs": 10, **server})
        s.start_extproc(cfg, workers=2)
        s.start_envoy(workers=2)
        wait_for(lambda: post(s.base_url, "/v1/chat/completions", BODY) == 200, 20, "the stack to answer")
        return s, db
    except BaseException:
        print(s.log("extproc")[-4000:], s.log("envoy")[-2000:])
        s.stop()
        raise


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[Stack, Path]]:
    s, db = start(tmp_path)
    try:
        yield s, db
    finally:
        s.stop()


def test_killed_worker_is_restarted_and_the_other_keeps_serving(stack: tuple[Stack, Path]):
    s, db = stack
    assert s.extproc is not None
    parent = s.extproc.pid
    workers = wait_for(lambda: (lambda c: c if len(c) == 2 else None)(children(parent)), 10, "two workers")
    statuses: list[int] = []
    failures: list[tuple[float, float, int]] = []  # (sent, answered, status) of each failed request
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            sent = time.monotonic()
            status = post(s.base_url, "/v1/chat/completions", BODY, timeout=10)
            statuses.append(status)
            if status != 200:
                failures.append((sent, time.monotonic(), status))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1)
        os.kill(workers[0], signal.SIGKILL)
        killed = time.monotonic()
        during = len(statuses)
        new = wait_for(lambda: (lambda c: c if len(c) == 2 and workers[0] not in c else None)(children(parent)),
                       15, "the dead worker to be started again")
        respawned = time.monotonic()
        time.sleep(3)  # load goes on while the new worker comes up and Envoy takes it back
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert s.extproc.poll() is None, "the parent exited when one worker died"
    assert workers[1] in new
    failed = [x for x in statuses if x != 200]
    metrics = httpx.get(f"http://127.0.0.1:{s.admin_port}/metrics", timeout=5).text
    assert "nexus_worker_restarts_total 1.0" in metrics
    # After the restart, the stack answers everything again; both ports serve.
    after = send_threads(100, lambda i: post(s.base_url, "/v1/chat/completions", BODY))
    assert after == [200] * 100
    # Every request that was answered is in the ledger (the dead worker's in-flight ones settle by the reaper).
    answered = statuses.count(200) + 100 + 1
    wait_for(lambda: ledger_spend(db)[1] >= answered, 45, f"{answered} settlements")
    # What may fail: each load thread's request in flight on the dead worker, and rarely one more while the new
    # worker comes up. Streams that cannot connect are retried by Envoy on the other worker
    # (grpc_service.retry_policy). Nothing sent 2 s after the restart may fail: a request sent before it can
    # break later (CI once saw one answered 2.7 s after the restart, with no record of when it was sent).
    shown = [(round(a - killed, 2), round(b - killed, 2), c) for a, b, c in failures]
    timeline = f"failures (sent, answered, status) {shown} s after the kill, respawned at {respawned - killed:.2f} s"
    if failures:  # what Envoy and the workers said about them, for the next time this breaks on a loaded machine
        timeline += "\nenvoy: " + "\n".join(x for x in s.log("envoy").splitlines() if '" 200 ' not in x)[-3000:]
        timeline += "\nextproc: " + s.log("extproc")[-4000:]
        stats = httpx.get(f"http://127.0.0.1:{s.envoy_admin_port}/stats", timeout=5).text.splitlines()
        timeline += "\nstats: " + "\n".join(x for x in stats if ("nexus_extproc" in x or "ext_proc" in x)
                                              and not x.endswith(": 0"))
    assert len(failed) <= len(threads), f"{len(failed)} of {len(statuses)} requests failed around the kill; {timeline}"
    assert all(sent - respawned < 2.0 for sent, _, _ in failures), f"failures 2 s after the restart; {timeline}"
    print(timeline)
    print(f"worker kill -9: {len(statuses)} requests under load ({during} before the kill), {len(failed)} failed "
          f"({sorted(set(failed))}), then 100/100 answered; parent alive, 1 restart")


def test_supervisor_backs_off_and_stops_on_a_crash_loop(monkeypatch):
    """Workers that die at once: restarts come later and later, and the parent gives up past the limit."""
    from nexus_extproc import app

    started: list[float] = []

    def spawn(config_path: str, port: int, index: int, workers: int) -> subprocess.Popen[bytes]:
        started.append(time.monotonic())
        return subprocess.Popen(["false"])

    monkeypatch.setattr(app, "spawn_worker", spawn)
    sup = app.Supervisor("unused.yaml", 1, 1)
    t0 = time.monotonic()
    while sup.check():
        time.sleep(0.05)
        assert time.monotonic() - t0 < 30, "never detected the crash loop"
    gaps = [b - a for a, b in itertools.pairwise(started)]
    assert len(started) == 1 + app.CRASH_LOOP[0]
    assert gaps[0] < 0.5 and gaps[-1] >= 1.5 and gaps == sorted(gaps, key=lambda g: round(g, 1)), gaps
    for c in sup.children:
        c.wait()


def test_workers_recycle_without_failing_a_request(tmp_path: Path):
    """max_streams_per_worker: each worker leaves after its streams, reporting NOT_SERVING first, and the
    parent replaces it; under steady load no request fails and no restart is counted as a crash."""
    s, db = start(tmp_path, max_streams_per_worker=150, recycle_drain_secs=6)
    try:
        assert s.extproc is not None
        first = wait_for(lambda: (lambda c: c if len(c) == 2 else None)(children(s.extproc.pid)), 10, "workers")
        statuses: list[int] = []
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                statuses.append(post(s.base_url, "/v1/chat/completions", BODY, timeout=10))
                time.sleep(0.01)

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            # Typically ~25 s (two drains of 6 s, two restarts); a loaded 2-core CI machine once took over 60.
            wait_for(lambda: not set(first) & set(children(s.extproc.pid)) and len(children(s.extproc.pid)) == 2,
                     150, "both workers to be replaced")
            time.sleep(3)  # and serve on the fresh ones
        finally:
            stop.set()
            for t in threads:
                t.join()
        metrics = httpx.get(f"http://127.0.0.1:{s.admin_port}/metrics", timeout=5).text
        recycles = float(re.search(r"^nexus_worker_recycles_total (\S+)", metrics, re.M).group(1))  # type: ignore[union-attr]
        failed = [x for x in statuses if x != 200]
        assert s.extproc.poll() is None
        assert recycles >= 2 and "nexus_worker_restarts_total 0.0" in metrics
        if failed:
            print(s.log("extproc")[-3000:])
        assert not failed, f"{len(failed)} of {len(statuses)} failed while workers recycled: {sorted(set(failed))}"
        wait_for(lambda: ledger_spend(db)[1] >= len(statuses), 20, "every answered request settled")
        print(f"recycling: {len(statuses)} requests, {recycles:.0f} recycles, 0 failed")
    finally:
        s.stop()


def test_workers_end_with_their_parent_when_it_is_killed_9(stack: tuple[Stack, Path]):
    s, _ = stack
    assert s.extproc is not None
    parent = s.extproc.pid
    workers = wait_for(lambda: (lambda c: c if len(c) == 2 else None)(children(parent)), 10, "two workers")
    s.extproc.kill()
    s.extproc.wait(10)
    assert wait_for(lambda: not any(alive(w) for w in workers), 15, "the workers to end with their parent")
    print(f"parent kill -9: workers {workers} ended with it")
