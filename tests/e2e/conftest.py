"""End-to-end fixtures: the real Envoy binary, fake upstreams and the ext_proc server as processes."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
import yaml

from nexus_dev.stack import Stack, admin_headers
from tests.conftest import BACKENDS

pytestmark = pytest.mark.e2e


def write_config(path: Path, **overrides: Any) -> Path:
    doc: dict[str, Any] = {
        "backends": BACKENDS,
        "equivalents": {"gpt-4o-mini": "ollama/llama3.1:8b"},
        "prices": {"llama3.1:8b": {"input_per_mtok": 0, "output_per_mtok": 0}},
        "server": {"grace_period_secs": 10},
    }
    doc.update(overrides)
    path.write_text(yaml.safe_dump(doc))
    return path


class E2E:
    """One Envoy + fakes; the ext_proc server restarts with a new config per scenario on the same port."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack

    def restart(self, **config: Any) -> Path:
        self.stack.stop_extproc()
        cfg = write_config(self.stack.workdir / f"config-{uuid.uuid4().hex[:6]}.yaml", **config)
        self.stack.start_extproc(cfg)
        self.wait_envoy_sees_extproc()
        return cfg

    def wait_envoy_sees_extproc(self, timeout: float = 15, admin_port: int | None = None) -> None:
        """Envoy's health check must mark the restarted server healthy before traffic is meaningful (this stack's
        Envoy, or another one's admin port)."""
        url = f"http://127.0.0.1:{admin_port or self.stack.envoy_admin_port}/clusters"
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            text = httpx.get(url, timeout=2).text
            lines = [ln for ln in text.splitlines() if ln.startswith("nexus_extproc::") and "::health_flags::" in ln]
            if lines and all(ln.endswith("::healthy") for ln in lines):
                return
            time.sleep(0.1)
        raise TimeoutError("Envoy never saw the ext_proc server healthy")

    @property
    def url(self) -> str:
        return self.stack.base_url

    def openai(self, **kw: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="sk-test-not-a-real-key", max_retries=0,
                             timeout=30, **kw)

    def anthropic(self) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=self.url, api_key="sk-ant-test", max_retries=0, timeout=30)

    def stats(self) -> dict[str, Any]:
        return httpx.get(f"http://127.0.0.1:{self.stack.admin_port}/v1/stats", timeout=5,
                         headers=admin_headers()).json()

    def metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.stack.admin_port}/metrics", timeout=5).text

    def fake_requests(self, name: str) -> list[dict[str, Any]]:
        return httpx.get(f"http://127.0.0.1:{self.stack.fake_ports[name]}/_fake/requests", timeout=5).json()


@contextlib.contextmanager
def running(stack: Stack) -> Iterator[Stack]:
    """Stops every process the stack started; on a failure first prints the tail of the server's and Envoy's logs."""
    try:
        yield stack
    except BaseException:
        print(stack.log("extproc")[-4000:], stack.log("envoy")[-4000:])
        raise
    finally:
        stack.stop()


def start_envoy_settled(stack: Stack, workers: int = 1, **fields: Any) -> None:
    """Envoy built with settlement="envoy" (issue 27) and any other EnvoyParams fields, on fresh ports."""
    stack.envoy_port = stack.envoy_admin_port = 0
    stack.envoy_port = stack.port()
    stack.envoy_admin_port = stack.port()
    params = stack.envoy_params(workers=workers)
    params.settlement = "envoy"
    for k, v in fields.items():
        setattr(params, k, v)
    stack.start_envoy(workers=workers, params=params)


@pytest.fixture(scope="module")
def e2e() -> Iterator[E2E]:
    with running(Stack()) as stack:
        stack.start_fakes()
        stack.fake_ports["vllm"] = stack.port()  # a local backend that is down: nothing listens there
        env = E2E(stack)
        cfg = write_config(stack.workdir / "initial.yaml")
        stack.start_extproc(cfg)
        stack.start_envoy()
        env.wait_envoy_sees_extproc()
        yield env


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path) -> dict[str, Any]:
    """A budget store for one test, on each kind: a fresh SQLite file, or a fresh key prefix on the Redis."""
    if request.param == "sqlite":
        return {"kind": "sqlite", "path": str(tmp_path / "ledger.db")}
    return {"kind": "redis", "url": request.getfixturevalue("redis_url"), "key_prefix": f"e2e{uuid.uuid4().hex[:6]}"}
