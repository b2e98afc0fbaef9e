"""deepinfer-router: parse settings, start the app on uvloop, shut down gracefully."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import sys
import time

from aiohttp import web

from . import __version__
from .app import build_app
from .logs import AccessLogger
from .settings import ENV_PREFIX, RouterSettings
from .shared.log_setup import configure_logging
from .shared.settings_loader import add_settings_arguments, parse_or_exit, render_example_toml
from .state import STATE
from .workers.siblings import SIBLINGS, catch_up
from .workers.slot import WorkerSlot

log = logging.getLogger("deepinfer.router")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepinfer-router",
        description="OpenAI-compatible router in front of a fleet of vLLM engines. "
        f"Every option can also be set as {ENV_PREFIX}<FLAG> or in the --config TOML file.",
        epilog="Tenants (their keys, weight, default class and budgets) are `[tenants.NAME]` "
        f"tables of the --config file, or JSON in {ENV_PREFIX}TENANTS; --api-key NAME:KEY "
        "flags and variables add keys to the file's (for repeatable options a flag replaces "
        "the file's list; a tenant's keys are a list of their own). See "
        "--print-config-example.",
    )
    parser.add_argument("--config", metavar="FILE", help="TOML settings file.")
    parser.add_argument("--version", action="version", version=f"deepinfer {__version__}")
    parser.add_argument(
        "--print-config-example", action="store_true",
        help="Print an example TOML file with every option, and exit.",
    )
    add_settings_arguments(parser, RouterSettings)
    return parser


def load(argv: list[str] | None = None) -> RouterSettings:
    parser = build_parser()
    ns = vars(parser.parse_args(argv))
    config = ns.pop("config", None)
    if ns.pop("print_config_example", False):
        print(render_example_toml(RouterSettings, "deepinfer-router settings", ENV_PREFIX))
        raise SystemExit(0)
    return parse_or_exit(RouterSettings, ns, config, ENV_PREFIX, "deepinfer-router")


async def serve(settings: RouterSettings, stop: asyncio.Event | None = None,
                slot: WorkerSlot | None = None) -> None:
    """Run until SIGTERM/SIGINT (or `stop`), then drain: refuse new requests, let
    in-flight ones finish up to --shutdown-grace-s, and close. As one of --workers
    (`slot`), on the supervisor's listening socket and its own Unix socket."""
    app = build_app(settings, slot)
    runner = web.AppRunner(
        app,
        access_log_class=AccessLogger,
        access_log=logging.getLogger("deepinfer.access"),
        handler_cancellation=True,  # a client that leaves cancels its upstream request
        # serve() itself waits up to --shutdown-grace-s for in-flight requests before
        # runner.cleanup(); what is still running then is cut after this short extra time
        # (never 0: aiohttp reads 0 as "wait forever").
        shutdown_timeout=max(0.1, min(settings.shutdown_grace_s, 1.0)),
    )
    await runner.setup()
    site: web.BaseSite
    if slot is None:
        site = web.TCPSite(runner, settings.host, settings.port, backlog=2048,
                           reuse_address=True)
        await site.start()
        log.info("listening on http://%s:%d", settings.host, settings.port)
    else:
        # siblings first: the port sends requests whose writes they must see; a worker
        # that starts again takes over their registrations and drains before serving
        await web.UnixSite(runner, str(slot.own_socket)).start()
        if await catch_up(app, app[SIBLINGS]):
            log.info("worker %d caught up with its siblings", slot.index)
        site = web.SockSite(runner, socket.socket(fileno=slot.fd), backlog=2048)
        await site.start()
        log.info("worker %d of %d serving on port %d", slot.index, slot.count, settings.port)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    state = app[STATE]
    state.shutting_down = True
    log.info("shutting down: waiting up to %.0fs for in-flight requests",
             settings.shutdown_grace_s)
    deadline = time.monotonic() + settings.shutdown_grace_s
    # Stop listening first so the load balancer moves on; open connections keep going
    # (new requests on them are answered 503 shutting_down), streams run to their end.
    await site.stop()
    if not await state.admission.wait_idle(deadline - time.monotonic()):
        log.warning("shutdown grace over: cutting %d request(s) still in flight",
                    state.admission.inflight)
    await runner.cleanup()
    log.info("stopped")


def main(argv: list[str] | None = None) -> int:
    settings = load(argv)
    configure_logging(settings.log_level, settings.log_format)
    slot = WorkerSlot.from_env()
    if slot is None and settings.worker_count() > 1:
        from .workers import supervisor

        return supervisor.run(list(sys.argv[1:] if argv is None else argv), settings.host,
                              settings.port, settings.worker_count(), settings.shutdown_grace_s)
    import uvloop

    try:
        uvloop.run(serve(settings, slot=slot))
    except OSError as exc:
        print(f"deepinfer-router: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
