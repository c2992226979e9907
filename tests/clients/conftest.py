"""The real agents, Claude Code and Codex from npm, run through the demo stack (real Envoy, our server, the fakes
compressing as the providers do). `make test` installs them (package.json); without npm they skip, and in CI
(NEXUS_REQUIRE_TOOLS=1) a missing one fails.

Each run gets its own HOME, so no user config, credentials or update check leaks in, and talks only to 127.0.0.1.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from nexus_dev.stack import Stack, admin_headers
from tests.e2e.conftest import E2E, running, write_config

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / "node_modules" / ".bin"

pytestmark = pytest.mark.e2e


def client_binary(name: str) -> Path:
    path = BIN / name
    if not path.exists():
        if os.environ.get("NEXUS_REQUIRE_TOOLS") == "1":
            pytest.fail(f"{name} is not installed ({path}); `make test` installs it with npm")
        pytest.skip(f"{name} not installed: `make test` installs it from npm (package.json) where npm exists")
    return path


class Live(E2E):
    """The e2e stack (restart, stats, metrics) plus a HOME for the agents and what they left behind."""

    def __init__(self, stack: Stack, home: Path) -> None:
        super().__init__(stack)
        self.home = home

    def spend_rows(self, group_by: str) -> list[dict[str, Any]]:
        return httpx.get(f"http://127.0.0.1:{self.stack.admin_port}/v1/spend?group_by={group_by}", timeout=5,
                         headers=admin_headers()).json()["rows"]

    def settled(self, timeout: float = 15) -> tuple[float, float]:
        """(spent, reserved) once nothing is reserved any more."""
        end = time.monotonic() + timeout
        b = self.stats()["budget"]
        while b["reserved_usd"] and time.monotonic() < end:
            time.sleep(0.05)
            b = self.stats()["budget"]
        return b["current_spending_usd"], b["reserved_usd"]

    def access_log(self) -> str:
        time.sleep(0.6)  # Envoy flushes it every 250 ms here
        return (self.stack.workdir / "access.log").read_text()

    def run(self, args: list[str], env: dict[str, str], timeout: float = 180) -> tuple[subprocess.CompletedProcess[str],
                                                                                       float]:
        start = time.monotonic()
        p = subprocess.run(args, env={"PATH": os.environ.get("PATH", ""), "HOME": str(self.home), "LANG": "C.UTF-8",
                                      "NO_COLOR": "1", **env},
                           cwd=self.home, capture_output=True, text=True, timeout=timeout)
        return p, time.monotonic() - start


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Iterator[Live]:
    stack = Stack()
    home = tmp_path_factory.mktemp("home")
    with running(stack):
        stack.start_fakes(compress=True)  # as the demo, and as the providers answer their clients
        stack.start_extproc(write_config(stack.workdir / "initial.yaml", budget={"monthly_limit_usd": 1000},
                                         store={"kind": "sqlite", "path": str(stack.workdir / "ledger.db")}))
        stack.start_envoy()
        env = Live(stack, home)
        env.wait_envoy_sees_extproc()
        yield env
