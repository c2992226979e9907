"""Shared fixtures: one tokenizer load per session, free-port Redis, config builders."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nexus_dev.stack import wait_port
from nexus_extproc.config import NexusConfig, parse_config
from nexus_extproc.metering.tokenizers import TokenCounter

BACKENDS = {
    "openai": {"cluster": "openai", "type": "cloud", "provider": "openai",
               "models": ["gpt-*", "o1*", "o3*", "text-embedding-*"], "default": True},
    "anthropic": {"cluster": "anthropic", "type": "cloud", "provider": "anthropic", "models": ["claude-*"],
                  "default": True},
    "ollama": {"cluster": "ollama", "type": "local", "provider": "openai", "models": ["llama3.1:8b"]},
}


def make_config(**overrides: Any) -> NexusConfig:
    doc: dict[str, Any] = {
        "backends": BACKENDS,
        "equivalents": {"gpt-4o-mini": "ollama/llama3.1:8b"},
        "prices": {"llama3.1:8b": {"input_per_mtok": 0, "output_per_mtok": 0}},
    }
    doc.update(overrides)
    return parse_config(doc, environ={})


@pytest.fixture(scope="session")
def counter() -> TokenCounter:
    return TokenCounter()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_binary() -> str:
    """redis-server, or a skip (a failure in CI, where .ci/run installs it)."""
    binary = shutil.which("redis-server")
    if binary is None or shutil.which("redis-cli") is None:
        if os.environ.get("NEXUS_REQUIRE_TOOLS") == "1":
            pytest.fail("redis-server / redis-cli are not installed")
        pytest.skip("redis-server not installed (.ci/run installs it)")
    return binary


def start_redis(port: int, d: Path, *extra: str) -> subprocess.Popen[bytes]:
    """A redis-server on 127.0.0.1:port with its files in d, once it accepts connections."""
    proc = subprocess.Popen([redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(d), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, 10, proc)
    return proc


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = _free_port()
    proc = start_redis(port, tmp_path_factory.mktemp("redis"))
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)

def _cluster_ports(n: int) -> list[int]:
    """n free ports whose cluster-bus ports (port + 10000) are free too."""
    ports: list[int] = []
    while len(ports) < n:
        p = _free_port()
        if p + 10000 > 65535 or p in ports:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p + 10000))
            except OSError:
                continue
        ports.append(p)
    return ports


@pytest.fixture(scope="session")
def redis_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real 3-master Redis Cluster on 127.0.0.1, created with redis-cli --cluster create."""
    redis_binary()
    cli = shutil.which("redis-cli") or "redis-cli"
    ports = _cluster_ports(3)
    procs = []
    try:
        for port in ports:
            d = tmp_path_factory.mktemp(f"cluster-{port}")
            procs.append(start_redis(port, d, "--cluster-enabled", "yes", "--cluster-config-file",
                                     str(d / "nodes.conf"), "--cluster-node-timeout", "2000"))
        subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports), "--cluster-replicas", "0",
                        "--cluster-yes"], check=True, capture_output=True, timeout=30)
        end = time.monotonic() + 20
        while time.monotonic() < end:
            info = subprocess.run([cli, "-p", str(ports[0]), "cluster", "info"], capture_output=True, text=True).stdout
            if "cluster_state:ok" in info:
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"the Redis Cluster never became ready: {info}")
        yield f"redis://127.0.0.1:{ports[0]}/0"
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)
