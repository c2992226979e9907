"""Wiring: build the components from config and run the gRPC server, the admin listener and the chores.

With `--workers N`, the parent process runs the admin listener and supervises N children, each serving
ext_proc on its own port (grpc_port + i). One port with SO_REUSEPORT does not spread Envoy's load (it keeps
one long-lived HTTP/2 connection per worker thread), so Envoy lists every port as an endpoint instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import grpc
from aiohttp import web
from envoy.service.accesslog.v3 import als_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from nexus_extproc.budget.admin import BudgetAdmin
from nexus_extproc.budget.alerts import AlertSender
from nexus_extproc.budget.service import BudgetService
from nexus_extproc.config import NexusConfig
from nexus_extproc.edge.access_log import AccessLogReceiver
from nexus_extproc.edge.admin_grpc import start_admin_api
from nexus_extproc.edge.admin_http import build_admin_app
from nexus_extproc.edge.email import send_mail
from nexus_extproc.edge.envoy_admin import poll_envoy_health
from nexus_extproc.edge.extproc import ExternalProcessor
from nexus_extproc.edge.peer import PeerCheck
from nexus_extproc.edge.webhook import post_json
from nexus_extproc.ledger import Ledger, StoreUnavailable, open_ledger
from nexus_extproc.metering.money import format_usd
from nexus_extproc.metering.pricing import PriceBook
from nexus_extproc.metering.tokenizers import TokenCounter
from nexus_extproc.ops import metrics
from nexus_extproc.ops.procs import PARENT_ENV
from nexus_extproc.ops.ratelimit import RateLimiter
from nexus_extproc.request.calibration import Calibrator
from nexus_extproc.request.pipeline import Processor
from nexus_extproc.request.router import Router

log = logging.getLogger("nexus_extproc")
SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"


def open_store(config: NexusConfig) -> Ledger | None:
    """No budget and no admin API: nothing to record. With an admin token, budgets may be created at runtime."""
    if not config.budget_defs() and not config.admin_api.token():
        return None
    s = config.store
    if s.kind == "sqlite":
        return open_ledger("sqlite", path=s.path, timeout_ms=s.timeout_ms, wal_max_bytes=s.wal_max_bytes)
    return open_ledger("redis", url=s.url, key_prefix=s.key_prefix, timeout_ms=s.timeout_ms, cluster=s.cluster)


@dataclass
class Components:
    processor: Processor
    budget: BudgetService
    prices: PriceBook


def budget_service(config: NexusConfig) -> BudgetService:
    """The budget service with its deliveries: the webhook, and alert mail where `alerts.email` is set."""
    email = config.alerts.email
    mail = None
    if email.smtp_host:
        password = os.environ.get(email.password_env)

        async def mail(to: list[str], subject: str, body: str) -> None:
            await send_mail(email, password, to, subject, body)

    return BudgetService(config, open_store(config), alerts=AlertSender(config.alerts, post_json), mail=mail)


def build(config: NexusConfig, counter: TokenCounter | None = None) -> Components:
    counter = counter or TokenCounter(config.estimation.approximation_factor)
    prices = PriceBook(config)
    missing = prices.check_configured(config)
    if missing:
        action = "rejected" if config.unpriced_model_action == "reject" else "charged the fallback price"
        log.warning("configured models without a known price will be %s", action,
                    extra={"models": ",".join(missing)})
    budget = budget_service(config)
    return Components(Processor(config, counter, prices, budget, Router(config)), budget, prices)


async def start_grpc(servicer: ExternalProcessor, host: str, port: int, uds: str | None = None
                     ) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 64 << 20)])
    ep_grpc.add_ExternalProcessorServicer_to_server(servicer, server)
    # Envoy's access-log stream: the usage of streams Envoy settles (server.settlement: envoy).
    servicer.access_log = AccessLogReceiver(servicer.processor, servicer.peer)
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(servicer.access_log, server)
    hs = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind gRPC on {host}:{port}")
    if uds:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(uds)  # a socket file left by a process that died: nobody listens on it
        if server.add_insecure_port(f"unix:{uds}") == 0:
            raise OSError(f"cannot bind gRPC on unix:{uds}")
    await server.start()
    await hs.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    await hs.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, bound, hs


async def start_admin(budget: BudgetAdmin, host: str, port: int, ready,  # type: ignore[no-untyped-def]
                      calibration: Calibrator | None = None, config: NexusConfig | None = None) -> web.AppRunner:
    token = config.admin_api.token() if config else None
    limiter = admin_limiter(config) if config else None
    runner = web.AppRunner(build_admin_app(budget, ready, calibration, token, limiter), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


def admin_limiter(config: NexusConfig) -> RateLimiter:
    a = config.admin_api
    return RateLimiter(a.rate_limit_per_second, a.rate_limit_burst)


def _install_stop(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)


async def serve_single(config: NexusConfig, worker_index: int | None = None) -> int:
    """One process: gRPC ext_proc (+ admin unless it is a child of a multi-worker parent)."""
    comps = build(config)
    comps.processor.worker = worker_index or 0
    servicer = ExternalProcessor(comps.processor, config.server.stream_idle_timeout_secs,
                                 PeerCheck(config.server.envoy_token()))
    port = config.server.grpc_port + (worker_index or 0)
    uds = config.server.uds_path
    if uds and worker_index is not None and config.server.workers > 1:
        uds = f"{uds}.{worker_index}"
    server, bound, hs = await start_grpc(servicer, config.server.grpc_host, port, uds)
    runner = None
    ready = True

    async def is_ready() -> bool:
        return ready

    admin_api = None
    with contextlib.suppress(StoreUnavailable):
        await comps.budget.load_settings()
    if worker_index is None:
        for d in comps.budget.defs:  # where each budget's limit and action come from (a runtime one also warns)
            log.info("budget", extra={"budget": d.name, "limit_usd": format_usd(d.settings.limit_micros, 2),
                                      "hard_limit_action": d.settings.hard_limit_action,
                                      **BudgetAdmin.provenance(d)})
        runner = await start_admin(comps.budget.admin, config.server.admin_host, config.server.admin_port, is_ready,
                                   comps.processor.calibration, config)
        admin_api, _ = await start_admin_api(comps.budget.admin, config.admin_api.host, config.admin_api.port,
                                             config.admin_api.token(), admin_limiter(config))
    chores = asyncio.gather(
        comps.budget.run_reconciler(config.budget.reconciliation_interval_secs if config.budget else 30),
        poll_envoy_health(config, comps.processor.router),
        comps.processor.calibration.run(comps.budget.ledger))
    log.info("nexus-extproc serving", extra={"grpc_port": bound, "admin_port": config.server.admin_port
                                             if runner else None, "worker": worker_index})
    stop = asyncio.Event()
    _install_stop(stop)
    recycle = None
    limit = config.server.max_streams_per_worker
    if limit and worker_index is not None:
        base = config.server.grpc_port
        recycle = asyncio.create_task(_recycle_after(
            servicer, hs, stop, limit, config.server.recycle_drain_secs, config.server.grpc_host, port,
            [base + i for i in range(config.server.workers)]))
    await stop.wait()
    if recycle is not None and not recycle.done():
        recycle.cancel()
    log.info("draining", extra={"active_streams": servicer.active})
    ready = False
    await hs.enter_graceful_shutdown()
    shutdown = asyncio.create_task(server.stop(config.server.grace_period_secs))
    await servicer.drain(config.server.grace_period_secs)
    await shutdown
    chores.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await chores  # retrieved, so a clean stop logs no "exception was never retrieved"
    if runner:
        await runner.cleanup()
    if admin_api:
        await admin_api.stop(1)
    await comps.budget.alerts.drain(min(5.0, config.server.grace_period_secs))  # queued webhooks go out first
    if comps.budget.ledger:
        with contextlib.suppress(Exception):  # the samples since the last flush; a dead store loses only these
            await comps.processor.calibration.sync(comps.budget.ledger)
        await comps.budget.ledger.close()
    log.info("stopped")
    return RECYCLED if recycle is not None and not recycle.cancelled() and recycle.done() else 0


RECYCLED = 75  # exit code of a worker that left after max_streams_per_worker: the parent replaces it at once


async def _recycle_after(servicer: ExternalProcessor, hs: health.aio.HealthServicer, stop: asyncio.Event,
                         limit: int, drain: float, host: str, own: int, siblings: list[int]) -> bool:
    """Leave once `limit` streams (jittered) have been served: report NOT_SERVING first and keep serving for
    `drain` seconds, so Envoy has moved new streams to the other workers before this one stops listening."""
    target = int(limit * random.uniform(0.9, 1.1))
    while servicer.started < target:  # noqa: ASYNC110 (polling a counter: no per-stream wake-up)
        await asyncio.sleep(1.0)
    # One worker away at a time, and only while every other one serves: the lock is held until this process
    # exits (the kernel drops it), and the next worker to take it checks that the replacement is up.
    lock = open(os.path.join(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.gettempdir(),  # noqa: ASYNC230
                             f"nexus-recycle-{siblings[0]}.lock"), "a")  # once per worker lifetime
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            await asyncio.sleep(1.0)
            continue
        if all([await _grpc_serving(host, p) for p in siblings if p != own]):
            break
        fcntl.flock(lock, fcntl.LOCK_UN)
        await asyncio.sleep(1.0)
    log.info("recycling this worker", extra={"streams": servicer.started})
    await hs.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
    await hs.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    await asyncio.sleep(drain)
    stop.set()
    return True


async def _grpc_serving(host: str, port: int) -> bool:
    try:
        async with grpc.aio.insecure_channel(f"{host}:{port}") as ch:
            resp = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=0.5)
            return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)
    except grpc.RpcError:
        return False


def spawn_worker(config_path: str, grpc_port: int, index: int, workers: int) -> subprocess.Popen[bytes]:
    # A worker ends with its parent, also when the parent is killed -9 (it sets PR_SET_PDEATHSIG itself).
    return subprocess.Popen([sys.executable, "-m", "nexus_extproc", "serve", "--config", config_path,
                             "--grpc-port", str(grpc_port), "--worker-index", str(index),
                             "--workers", str(workers)], env={**os.environ, PARENT_ENV: str(os.getpid())})


def spawn_workers(config_path: str, grpc_port: int, workers: int) -> list[subprocess.Popen[bytes]]:
    return [spawn_worker(config_path, grpc_port, i, workers) for i in range(workers)]


CRASH_LOOP = (5, 60.0)  # more restarts than this within this many seconds: stop, the fault is not transient


class Supervisor:
    """Keeps N workers running: a worker that dies (OOM kill, a segfault in a C extension, kill -9) is
    started again on its own port while the others go on serving, and its expired reservations are settled
    or released by the reaper. Only a crash loop stops the parent, so a broken deploy still fails visibly."""

    def __init__(self, config_path: str, base_port: int, workers: int) -> None:
        self.config_path, self.base_port = config_path, base_port
        self.children = spawn_workers(config_path, base_port, workers)
        self.restarts: list[float] = []
        self.due: dict[int, float] = {}  # worker index -> when it may start again (backoff)

    def check(self) -> bool:
        """Restart dead workers; False when they are crash-looping. The first restart in the window is at
        once (a lone OOM kill costs one worker for the time it takes to start); each further one waits twice
        as long, up to 4 s, so a worker that dies on start does not spin."""
        now = time.monotonic()
        for i, c in enumerate(self.children):
            if c.poll() is None:
                continue
            if c.returncode == RECYCLED:
                metrics.worker_recycles.inc()
                log.info("worker recycled; starting a fresh one", extra={"worker": i})
                self._replace(i, c)
                continue
            if i not in self.due:
                self.restarts = [t for t in self.restarts if now - t < CRASH_LOOP[1]] + [now]
                if len(self.restarts) > CRASH_LOOP[0]:
                    log.error("workers are crash-looping; stopping", extra={
                        "restarts": len(self.restarts), "window_s": CRASH_LOOP[1], "exit_code": c.returncode})
                    return False
                delay = 0.0 if len(self.restarts) == 1 else min(4.0, 0.25 * 2 ** (len(self.restarts) - 1))
                self.due[i] = now + delay
                log.error("a worker exited; starting it again", extra={
                    "worker": i, "exit_code": c.returncode, "in_s": delay})
            if now >= self.due[i]:
                del self.due[i]
                metrics.worker_restarts.inc()
                self._replace(i, c)
        return True

    def _replace(self, i: int, dead: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(Exception):
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(dead.pid)  # its live gauges (open streams) no longer count
        self.children[i] = spawn_worker(self.config_path, self.base_port, i, len(self.children))


async def serve_workers(config: NexusConfig, config_path: str, workers: int) -> int:
    """Parent of N workers: admin listener here, ext_proc in the children, metrics summed across them."""
    mp_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(prefix="nexus-prom-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = mp_dir
    supervisor = Supervisor(config_path, config.server.grpc_port, workers)
    children = supervisor.children
    budget = budget_service(config)
    host, base = config.server.grpc_host, config.server.grpc_port

    async def is_ready() -> bool:
        if any(c.poll() is not None for c in children):
            return False
        return all([await _grpc_serving(host, base + i) for i in range(workers)])

    # The parent serves /v1/stats: it reads the workers' shared calibration from the store (it settles nothing).
    calibration = Calibrator(config.estimation.calibration_half_life_hours * 3600,
                             config.estimation.calibration_flush_secs)
    cal_task = asyncio.create_task(calibration.run(budget.ledger)) if budget.ledger else None
    runner = await start_admin(budget.admin, config.server.admin_host, config.server.admin_port, is_ready, calibration,
                               config)
    admin_api, _ = await start_admin_api(budget.admin, config.admin_api.host, config.admin_api.port,
                                         config.admin_api.token(), admin_limiter(config))
    stop = asyncio.Event()
    _install_stop(stop)
    rc = 0
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)
        if not stop.is_set() and not supervisor.check():
            rc = 1
            break
    for c in children:
        if c.poll() is None:
            c.send_signal(signal.SIGTERM)
    for c in children:
        try:
            await asyncio.to_thread(c.wait, config.server.grace_period_secs + 5)
        except subprocess.TimeoutExpired:
            c.kill()
    if cal_task:
        cal_task.cancel()
    await runner.cleanup()
    if admin_api:
        await admin_api.stop(1)
    if budget.ledger:
        await budget.ledger.close()
    return rc
