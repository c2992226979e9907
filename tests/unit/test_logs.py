import logging

from nexus_extproc.ops.logs import JsonFormatter, PlainFormatter


def _record_with_exception() -> logging.LogRecord:
    secret = "prompt text " + "SECRET" + "MARKER " + "sk-live" + "-key"  # not in any source line
    try:
        raise ValueError(secret)
    except ValueError:
        import sys

        return logging.LogRecord("t", logging.ERROR, __file__, 1, "stream failed", (), sys.exc_info())


def test_exception_messages_never_reach_the_log():
    for fmt in (PlainFormatter("%(message)s"), JsonFormatter()):
        out = fmt.format(_record_with_exception())
        assert "ValueError" in out and "stream failed" in out
        assert "SECRETMARKER" not in out and "sk-live-key" not in out
