"""Task and tag attribution from the trusted x-nexus-task / x-nexus-tags headers.

They end up in the ledger and in reports (and a FOCUS export's `Tags`), so they are bounded like any label that
reaches storage: a task of up to 64 characters, up to 8 tags of up to 48 each, from a small character set. A
header outside that is refused with a 400 rather than cut: a silently truncated tag would report spend under a
name nobody chose.
"""

from __future__ import annotations

import re

MAX_TASK_LEN = 64
MAX_TAGS = 8
MAX_TAG_LEN = 48
_TASK = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/@-]*")
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/@=-]*")  # "key=value" tags are allowed


class BadAttribution(ValueError):
    """The header is refused; the message names the header and the rule, never its value."""


def parse_task(value: str | None) -> str:
    if value is None or not value.strip():
        return ""
    v = value.strip()
    if len(v) > MAX_TASK_LEN or not _TASK.fullmatch(v):
        raise BadAttribution(f"x-nexus-task must be 1-{MAX_TASK_LEN} characters of [A-Za-z0-9_.:/@-]")
    return v


def parse_tags(value: str | None) -> str:
    """The normalised comma list: sorted and unique, so the same set always groups together."""
    if value is None or not value.strip():
        return ""
    tags = {t.strip() for t in value.split(",") if t.strip()}
    if len(tags) > MAX_TAGS:
        raise BadAttribution(f"x-nexus-tags takes at most {MAX_TAGS} tags")
    for t in tags:
        if len(t) > MAX_TAG_LEN or not _TAG.fullmatch(t):
            raise BadAttribution(f"each x-nexus-tags entry must be 1-{MAX_TAG_LEN} characters of "
                                 "[A-Za-z0-9_.:/@=-]")
    return ",".join(sorted(tags))


def split_tags(tags: str) -> list[str]:
    return tags.split(",") if tags else []
