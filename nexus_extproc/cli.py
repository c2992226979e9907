"""Command line: `serve` (default), `check-config`, `hash-key`, `calibration`, and the admin API commands."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile

from nexus_extproc.config import ConfigError, NexusConfig, load_config, parse_config


def _serve(args: argparse.Namespace) -> int:
    from nexus_extproc.metering.pricing import check_price_providers

    try:
        config = load_config(args.config) if args.config else parse_config(
            {"backends": {"openai": {"cluster": "openai", "type": "cloud", "provider": "openai"}}})
        check_price_providers(config)
    except ConfigError as e:
        print(f"nexus-extproc: {e}", file=sys.stderr)
        return 2
    overrides = {k: v for k, v in (("grpc_port", args.grpc_port), ("admin_port", args.admin_port),
                                   ("workers", args.workers)) if v is not None}
    if overrides:
        config = config.model_copy(update={"server": config.server.model_copy(update=overrides)})
    if args.worker_index is None and config.server.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Before prometheus_client is imported: the parent's own counters (rollovers, alerts) must land in the
        # shared files too, or its /metrics would sum only the children.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="nexus-prom-")
    from nexus_extproc.app import serve_single, serve_workers
    from nexus_extproc.ops.logs import setup_logging

    if args.worker_index is None:
        taken = _taken_port(config)
        if taken:
            print(f"nexus-extproc: {taken}", file=sys.stderr)
            return 2

    setup_logging(config.server.log_level, config.server.log_json)
    if config.server.event_loop == "uvloop":
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
    from nexus_extproc.ledger import StoreOpenError
    from nexus_extproc.ledger.sqlite import LedgerSchemaError

    try:
        if args.worker_index is not None:
            from nexus_extproc.ops.procs import die_with_parent_from_env

            die_with_parent_from_env()
        if args.worker_index is None and config.server.workers > 1:
            return asyncio.run(serve_workers(config, args.config, config.server.workers))
        return asyncio.run(serve_single(config, args.worker_index))
    except (StoreOpenError, LedgerSchemaError) as e:
        print(f"nexus-extproc: cannot open the budget store: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno in (98, 48):  # EADDRINUSE (Linux, macOS)
            print(f"nexus-extproc: a port is already in use ({e.strerror}); is another server running?",
                  file=sys.stderr)
            return 2
        raise


def _taken_port(config: NexusConfig) -> str | None:
    """The first port the server would bind that another process listens on, with the way to move it; checked
    before anything starts, as the servers bind (SO_REUSEADDR: TIME_WAIT of a last run is no conflict)."""
    import socket

    srv = config.server
    wanted = [(srv.grpc_host, srv.grpc_port + i, "the ext_proc gRPC port", "--grpc-port or server.grpc_port")
              for i in range(srv.workers)]
    wanted.append((srv.admin_host, srv.admin_port, "the admin HTTP port", "--admin-port or server.admin_port"))
    if config.admin_api.token():
        wanted.append((config.admin_api.host, config.admin_api.port, "the admin gRPC API port", "admin_api.port"))
    for host, port, what, how in wanted:
        if port == 0:
            continue
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                return f"port {port} ({what}) on {host} is in use; is another server running? Move it with {how}"
    return None


def _check(args: argparse.Namespace) -> int:
    from nexus_extproc.metering.pricing import PriceBook, check_price_providers

    try:
        config = load_config(args.config)
        check_price_providers(config)
    except ConfigError as e:
        print(f"nexus-extproc: {e}", file=sys.stderr)
        return 2

    missing = PriceBook(config).check_configured(config)
    for m in missing:
        print(f"warning: model {m!r} has no known price ({config.unpriced_model_action})", file=sys.stderr)
    print(f"{args.config}: OK")
    return 0


def _calibration(args: argparse.Namespace) -> int:
    """`calibration show|reset`: the learned estimate ratios in the configured store (every replica rereads
    them within `estimation.calibration_flush_secs`, so a reset reaches all of them)."""
    import json as _json

    from nexus_extproc.app import open_store
    from nexus_extproc.request.calibration import Calibrator

    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"nexus-extproc: {e}", file=sys.stderr)
        return 2
    ledger = open_store(config)
    if ledger is None:
        print("nexus-extproc: no budgets configured, so no store: calibration lives in each process's memory "
              "and ends with it", file=sys.stderr)
        return 2

    async def go() -> int:
        cal = Calibrator(config.estimation.calibration_half_life_hours * 3600)
        try:
            if args.action == "reset":
                n = await cal.reset(ledger)
                print(f"calibration reset: {n} keys dropped")
            else:
                await cal.sync(ledger)
                print(_json.dumps(cal.snapshot(), indent=2))
        finally:
            await ledger.close()
        return 0

    return asyncio.run(go())


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file")
    p.add_argument("--grpc-port", type=int)
    p.add_argument("--admin-port", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nexus-extproc", description=__doc__)
    sub = parser.add_subparsers(dest="cmd")
    _add_serve_args(sub.add_parser("serve", help="run the ext_proc server"))
    c = sub.add_parser("check-config", help="validate a config file and exit")
    c.add_argument("config")
    h = sub.add_parser("hash-key", help="print the salted hash to use as a budget's scope.api_key_hash")
    h.add_argument("--salt-env", default="NEXUS_API_KEY_SALT")
    cal = sub.add_parser("calibration", help="show or reset the learned estimate ratios in the store")
    cal.add_argument("action", choices=("show", "reset"))
    cal.add_argument("--config", required=True)
    sub.add_parser("demo", help="moved: run `make up` (python -m nexus_dev) from a clone")
    from nexus_extproc.edge.admin_cli import add_admin_args, run_admin

    add_admin_args(sub)
    _add_serve_args(parser)
    args = parser.parse_args(argv)
    if args.cmd == "check-config":
        return _check(args)
    if args.cmd == "hash-key":
        import getpass
        import os

        from nexus_extproc.budget.scopes import hash_api_key

        key = getpass.getpass("API key (not echoed): ") if sys.stdin.isatty() else sys.stdin.readline().strip()
        print(hash_api_key(key, os.environ.get(args.salt_env, "").encode()))
        return 0
    if args.cmd == "calibration":
        return _calibration(args)
    if args.cmd == "demo":
        # The demo's fakes and its Envoy are dev tooling, not part of the installed package.
        print("nexus-extproc: the demo runs from a clone of the repository: `make up` (python -m nexus_dev)",
              file=sys.stderr)
        return 2
    from nexus_extproc.edge.admin_cli_finops import COMMANDS as FINOPS_COMMANDS

    if args.cmd in ("status", "set-limit", "reset-limit", "override", "spend", *FINOPS_COMMANDS):
        return run_admin(args)
    return _serve(args)
