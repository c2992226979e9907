"""Incremental Server-Sent Events parser that survives chunks split anywhere.

Envoy hands us the response in whatever pieces the upstream wrote: a line, a JSON document, even a UTF-8
character may straddle two chunks. Lines are split on bytes (a newline byte never occurs inside a UTF-8
sequence) and decoded only once complete, so a split character is never mangled. Every event keeps its
raw bytes so a caller can drop one (an unrequested usage chunk) and pass the rest through byte-exact.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_EOL = re.compile(rb"[\r\n]")


@dataclass(frozen=True, slots=True)
class SSEEvent:
    raw: bytes
    event: str | None = None
    data: str | None = None  # None: the block had no data lines (comments, retry:, overflow)
    overflow: bool = False


class SSEParser:
    def __init__(self, max_event_bytes: int = 1 << 20) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._event: str | None = None
        self._data: list[str] = []
        self._max = max_event_bytes
        self._skipping = False
        self.overflows = 0

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        buf = self._buf
        buf += chunk
        out: list[SSEEvent] = []
        while True:
            m = _EOL.search(buf, self._pos)
            if m is None:
                break
            i = m.start()
            if buf[i] == 0x0D:  # CR: a CRLF may be split across chunks, so wait for the next byte
                if i + 1 >= len(buf):
                    break
                end = i + 2 if buf[i + 1] == 0x0A else i + 1
            else:
                end = i + 1
            line = bytes(buf[self._pos:i])
            self._pos = end
            if line:
                if not self._skipping:
                    self._field(line)
                continue
            raw = bytes(buf[:end])
            del buf[:end]
            self._pos = 0
            out.append(self._dispatch(raw))
        if len(buf) > self._max:
            # One event larger than any real usage chunk: give up parsing it, keep the bytes flowing.
            out.append(SSEEvent(raw=bytes(buf), overflow=True))
            buf.clear()
            self._pos = 0
            self._reset()
            self._skipping = True
            self.overflows += 1
        return out

    def pending(self) -> bytes:
        """Raw bytes of the event not yet terminated by a blank line."""
        return bytes(self._buf)

    def flush(self) -> list[SSEEvent]:
        """End of stream: a final event without its blank line still counts (truncated streams)."""
        if not self._buf:
            return []
        if self._pos < len(self._buf) and not self._skipping:
            tail = bytes(self._buf[self._pos:]).rstrip(b"\r")
            if tail:
                self._field(tail)
        raw = bytes(self._buf)
        self._buf.clear()
        self._pos = 0
        return [self._dispatch(raw)]

    def _reset(self) -> None:
        self._event = None
        self._data = []
        self._skipping = False

    def _field(self, line: bytes) -> None:
        if line[:1] == b":":
            return
        name, sep, value = line.partition(b":")
        if sep and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data.append(value.decode("utf-8", "replace"))
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")

    def _dispatch(self, raw: bytes) -> SSEEvent:
        ev = SSEEvent(raw=raw, event=self._event, data="\n".join(self._data) if self._data else None)
        self._reset()
        return ev
