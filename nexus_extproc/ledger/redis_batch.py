"""The hot Lua scripts of concurrent requests (reserve, forwarded mark, settle) sent as one pipeline per
event-loop tick instead of one round trip each.

Each script call stays one atomic EVALSHA; batching only shares the network round trip and redis-py's per-call
machinery among the calls that were issued in the same tick. Plain EVALSHA (not redis-py's pipeline scripts,
which ask SCRIPT EXISTS on every execute); a Redis that lost its scripts (restarted) answers NOSCRIPT, and those
calls run again one by one through the Script objects, which load them.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

_Call = tuple[AsyncScript, list[str], list[Any], "asyncio.Future[Any]"]


class ScriptBatcher:
    def __init__(self, client: Redis) -> None:
        self._r = client
        self._pending: list[_Call] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush_soon)
        self._pending.append((script, keys, args, fut))
        return await fut

    def _flush_soon(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.get_running_loop().create_task(self._flush(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _flush(self, batch: list[_Call]) -> None:
        if len(batch) == 1:
            script, keys, args, fut = batch[0]
            await self._one(script, keys, args, fut)
            return
        pipe = self._r.pipeline(transaction=False)
        for script, keys, args, _ in batch:
            pipe.evalsha(script.sha, len(keys), *keys, *args)
        try:
            results = await pipe.execute(raise_on_error=False)
        except BaseException as e:  # the connection failed: every call in the batch gets it
            for *_, fut in batch:
                if not fut.done():
                    fut.set_exception(e)
            return
        for (script, keys, args, fut), out in zip(batch, results, strict=True):
            if isinstance(out, NoScriptError):
                await self._one(script, keys, args, fut)
            elif fut.done():
                continue
            elif isinstance(out, BaseException):
                fut.set_exception(out)
            else:
                fut.set_result(out)

    @staticmethod
    async def _one(script: AsyncScript, keys: list[str], args: list[Any], fut: asyncio.Future[Any]) -> None:
        try:
            out = await script(keys=keys, args=args)
        except BaseException as e:
            if not fut.done():
                fut.set_exception(e)
            return
        if not fut.done():
            fut.set_result(out)
