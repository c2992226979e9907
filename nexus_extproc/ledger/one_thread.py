"""One thread that runs a store's blocking calls in order and hands the results back to the event loop in
batches.

`run_in_executor` costs two futures, a callback chain and a wake-up of the event loop per call; under load the
SQLite ledger makes three calls per request (reserve, forwarded mark, settle), and the thread hand-offs cost more
CPU than the SQL. Here a call is one queue put; the thread runs whatever has queued up meanwhile, then wakes the
loop once for the whole batch. Calls still run one at a time, in order, on one connection.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
_Item = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[[], Any]]
_MAX_BATCH = 64


def _resolve(results: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for fut, value, exc in results:
        if fut.cancelled():
            continue
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(value)


class OneThread:
    def __init__(self, name: str) -> None:
        self._q: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def call(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._q.put((loop, fut, fn))
        return fut

    def shutdown(self) -> None:
        """After the calls already queued."""
        self._q.put(None)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            item = self._q.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < _MAX_BATCH:
                try:
                    nxt = self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                    break
                batch.append(nxt)
            done: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any, BaseException | None]]] = {}
            for loop, fut, fn in batch:
                try:
                    out: tuple[asyncio.Future[Any], Any, BaseException | None] = (fut, fn(), None)
                except BaseException as e:  # handed to the awaiting coroutine, which decides
                    out = (fut, None, e)
                done.setdefault(loop, []).append(out)
            for loop, results in done.items():
                try:
                    loop.call_soon_threadsafe(_resolve, results)
                except RuntimeError:
                    pass  # the loop closed meanwhile: nobody awaits these any more
