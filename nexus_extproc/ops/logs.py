"""Logging setup: plain or JSON lines. Callers pass only bounded facts in `extra` (status, phase, counts);
prompt text, bodies and credentials are never handed to a logger."""

from __future__ import annotations

import json
import logging
import sys
import traceback
from typing import Any

_STD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {"ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), "level": record.levelname,
               "logger": record.name, "msg": record.getMessage()}
        doc.update({k: v for k, v in record.__dict__.items() if k not in _STD})
        if record.exc_info and record.exc_info[0] is not None:
            doc["exc_type"] = record.exc_info[0].__name__
            doc["stack"] = _safe_exc(record.exc_info)
        return json.dumps(doc, default=str)


def _safe_exc(exc_info: Any) -> str:
    """Exception type and stack frames only: an exception's message may carry request content."""
    etype, _, tb = exc_info
    return "".join(traceback.format_tb(tb)) + (etype.__name__ if etype else "")


class PlainFormatter(logging.Formatter):
    def formatException(self, ei: Any) -> str:
        return _safe_exc(ei)

    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        extras = {k: v for k, v in record.__dict__.items() if k not in _STD}
        return base + ("" if not extras else " " + " ".join(f"{k}={v}" for k, v in extras.items()))


def setup_logging(level: str = "INFO", as_json: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if as_json else PlainFormatter("%(asctime)s %(levelname)s %(name)s: "
                                                                         "%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("nexus_extproc").setLevel(level)
