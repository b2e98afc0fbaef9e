"""`deepinfer-engine sim`: run one simulated vLLM engine until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys

from deepinfer_router.shared.log_setup import configure_logging
from deepinfer_router.shared.settings_loader import add_settings_arguments, parse_or_exit

from .settings import ENV_PREFIX, SimSettings

PROG = "deepinfer-engine sim"
log = logging.getLogger("deepinfer.engine.sim")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="A simulated vLLM engine: vLLM's HTTP API and metrics over a model of "
        "its paged KV cache (prefix caching, LRU eviction) and continuous batching. "
        f"Options also come from {ENV_PREFIX}<FLAG> environment variables and --config.",
    )
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="TOML file with options (keys are flag names in snake_case).")
    add_settings_arguments(parser, SimSettings)
    return parser


def load(argv: list[str]) -> SimSettings:
    args = vars(build_parser().parse_args(argv))
    config = args.pop("config", None)
    return parse_or_exit(SimSettings, args, config, ENV_PREFIX, PROG)


async def serve(settings: SimSettings) -> int:
    from .server import start_sim_server

    try:
        sim = await start_sim_server(settings, settings.host, settings.port)
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", settings.host, settings.port, exc)
        return 1
    except Exception as exc:  # registration refused or registry unreachable
        log.error("cannot start: %s", exc)
        return 1
    engine = sim.state.engine
    log.info(
        "simulated engine %s serving %r at %s (kv_blocks=%d block_size=%d max_model_len=%d "
        "max_num_seqs=%d speed=%g)%s",
        sim.record().id, settings.model, sim.url, engine.kv.num_blocks, engine.block_size,
        engine.max_model_len, engine.max_num_seqs, settings.speed,
        f", registered at {settings.registry}" if settings.registry else "",
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):  # e.g. Windows
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("stopping: deregistering and closing")
        await sim.close()
    return 0


def _run(settings: SimSettings) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - Windows
        return asyncio.run(serve(settings))
    return uvloop.run(serve(settings))


def main(argv: list[str]) -> int:
    if argv[:1] == ["serve"]:  # started the way vLLM is (vllm_args.py)
        from .vllm_args import to_sim_argv

        argv = to_sim_argv(argv[1:])
    settings = load(argv)
    configure_logging(settings.log_level)
    return _run(settings)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
