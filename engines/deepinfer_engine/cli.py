"""deepinfer-engine: command-line entry point. Each subcommand lives in its own module."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

USAGE = """usage: deepinfer-engine COMMAND ...

On one host (imperative):
  gpus         NVML table of this host's GPUs
  launch       start vLLM on selected GPUs, supervise and register it
  sim          run a simulated vLLM engine (no GPU)
  list         engines launched on this host, or registered in a registry
  stop         stop an engine launched on this host

Across hosts (declarative; a router with --redis-url and agents on the GPU hosts):
  agent        run this host's share of the declared deployments
  deploy       declare a deployment (MODEL, replicas, TP, ...)
  deployments  the deployments and each replica's state
  scale        change a deployment's replica count
  undeploy     drain, stop and remove a deployment
  hosts        every live agent with its labels and GPUs
"""


# --- gpus ----------------------------------------------------------------------------------


def gpus_main(argv: list[str]) -> int:
    from .gpus import format_table, to_json
    from .nvml import NvmlUnavailable, open_gpu_source

    parser = argparse.ArgumentParser(prog="deepinfer-engine gpus",
                                     description="This host's GPUs, as NVML sees them.")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    ns = parser.parse_args(argv)
    try:
        snap = open_gpu_source().snapshot()
    except NvmlUnavailable as exc:
        print(f"deepinfer-engine gpus: {exc}", file=sys.stderr)
        return 2
    print(to_json(snap) if ns.json else format_table(snap))
    return 0


# --- launch --------------------------------------------------------------------------------


def parse_launch(argv: list[str]) -> Any:
    from deepinfer_router.shared.settings_loader import add_settings_arguments, parse_or_exit

    from .launch_settings import ENV_PREFIX, LaunchSettings

    extra: list[str] | None = None
    if "--" in argv:  # everything after `--` goes to `vllm serve` untouched
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    parser = argparse.ArgumentParser(
        prog="deepinfer-engine launch",
        usage="deepinfer-engine launch MODEL [options] [-- extra vllm serve args]",
        description="Start vLLM on free GPUs of this host, wait until it serves, register "
        "it, restart it after crashes, and stop it cleanly on SIGTERM/SIGINT. Each option "
        f"also reads {ENV_PREFIX}<OPTION> and the TOML key <option> (snake_case).",
    )
    parser.add_argument("model_arg", nargs="?", metavar="MODEL",
                        help="model to serve (Hugging Face id or local path)")
    parser.add_argument("--config", metavar="FILE", default=os.environ.get(ENV_PREFIX + "CONFIG"),
                        help="TOML settings file (see configs/engine.toml)")
    add_settings_arguments(parser, LaunchSettings, skip=("extra_args",))
    ns = parser.parse_args(argv)
    values = {k: v for k, v in vars(ns).items() if k not in ("model_arg", "config")}
    if ns.model_arg and "model" in values and values["model"] != ns.model_arg:
        parser.error("MODEL given twice (argument and --model)")
    if ns.model_arg:
        values["model"] = ns.model_arg
    if extra is not None:
        values["extra_args"] = extra
    settings = parse_or_exit(LaunchSettings, values, ns.config, ENV_PREFIX,
                             "deepinfer-engine launch")
    if not settings.model:
        parser.error("MODEL is required (argument, TOML key model, or DEEPINFER_ENGINE_MODEL)")
    return settings


def parse_agent(argv: list[str]) -> Any:
    from deepinfer_router.shared.settings_loader import add_settings_arguments, parse_or_exit

    from .agent_settings import ENV_PREFIX, AgentSettings

    parser = argparse.ArgumentParser(
        prog="deepinfer-engine agent",
        description="Run this host's share of the deployments declared in the shared Redis "
        "(POST /v1/deployments on a router, or deepinfer-engine deploy): claim replicas "
        "this host can hold, launch and supervise vLLM for them, register them, report "
        f"their state. Each option also reads {ENV_PREFIX}<OPTION> and the TOML key "
        "<option>; repeatable options (--labels, --allow-*) add to the file's values.",
    )
    parser.add_argument("--config", metavar="FILE", default=os.environ.get(ENV_PREFIX + "CONFIG"),
                        help="TOML settings file")
    add_settings_arguments(parser, AgentSettings)
    ns = parser.parse_args(argv)
    values = {k: v for k, v in vars(ns).items() if k != "config"}
    return parse_or_exit(AgentSettings, values, ns.config, ENV_PREFIX, "deepinfer-engine agent")


def agent_main(argv: list[str]) -> int:
    from .agent import run_agent

    return run_agent(parse_agent(argv))


def launch_main(argv: list[str]) -> int:
    from .supervisor import run_launch

    return run_launch(parse_launch(argv))


# --- list ----------------------------------------------------------------------------------


async def list_registry(url: str, key: str | None, namespace: str) -> list[dict[str, Any]]:
    """The engines a registry holds (registry_list.py: a shared Redis or a router)."""
    from .registry_list import list_registered

    return [r.model_dump(mode="json") for r in await list_registered(url, key, namespace)]


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def _age(ts: float) -> str:
    if not ts:
        return "-"
    s = max(0, int(time.time() - ts))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def list_main(argv: list[str]) -> int:
    from .launch_state import StateDir, resolve_state_dir

    parser = argparse.ArgumentParser(
        prog="deepinfer-engine list",
        description="Engines launched on this host, or (with --registry) registered engines.")
    parser.add_argument("--registry", default=os.environ.get("DEEPINFER_ENGINE_REGISTRY"),
                        help="list a registry (http://router:8080 or redis://...) instead")
    parser.add_argument("--registry-key", default=os.environ.get("DEEPINFER_ENGINE_REGISTRY_KEY"),
                        help="admin key of the router's embedded registry")
    parser.add_argument("--registry-namespace",
                        default=os.environ.get("DEEPINFER_ENGINE_REGISTRY_NAMESPACE", "deepinfer"),
                        help="key prefix in a Redis registry")
    parser.add_argument("--state-dir", default=None, help="host-local state directory")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    ns = parser.parse_args(argv)

    if ns.registry:
        try:
            engines = asyncio.run(
                list_registry(ns.registry, ns.registry_key, ns.registry_namespace))
        except Exception as exc:  # one line for the operator, whatever went wrong
            print(f"deepinfer-engine list: {exc}", file=sys.stderr)
            return 1
        if ns.json:
            print(json.dumps(engines, indent=2))
            return 0
        rows = [["ID", "URL", "MODELS", "GPUS", "KV BLOCKS", "DEVICE", "UP"]]
        for rec in engines:
            rows.append([str(rec.get("id", "")), str(rec.get("url", "")),
                         ",".join(rec.get("models", [])), str(len(rec.get("gpus", []))),
                         str((rec.get("capacity") or {}).get("kv_blocks") or "-"),
                         (rec.get("labels") or {}).get("device", "-"),
                         _age(float(rec.get("started_at") or 0))])
        print(_table(rows) if engines else "no engines registered")
        return 0

    state = StateDir(resolve_state_dir(ns.state_dir))
    entries = state.entries()
    if ns.json:
        print(json.dumps([e.model_dump(mode="json") for e in entries], indent=2))
        return 0
    if not entries:
        print(f"no engines launched on this host (state: {state.path})")
        return 0
    rows = [["ID", "MODEL", "URL", "PID", "GPUS", "STATE", "RESTARTS", "UP"]]
    for e in entries:
        rows.append([e.id, e.model, e.url, str(e.pid),
                     ",".join(map(str, e.gpu_indices)) or "none", e.state, str(e.restarts),
                     _age(e.started_at)])
    print(_table(rows))
    return 0


# --- stop ----------------------------------------------------------------------------------


def stop_main(argv: list[str]) -> int:
    from .launch_state import StateDir, pid_alive, resolve_state_dir
    from .launcher import stop_unsupervised_group

    parser = argparse.ArgumentParser(
        prog="deepinfer-engine stop",
        description="Stop an engine launched on this host: its supervisor deregisters it, "
        "then stops vLLM's process group.")
    parser.add_argument("id", metavar="ID",
                        help="engine id (or a unique prefix), its port, or its model name")
    parser.add_argument("--state-dir", default=None, help="host-local state directory")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds to wait for the stop (default: the engine's stop "
                        "timeout + 15)")
    parser.add_argument("--no-wait", action="store_true", help="signal and return at once")
    ns = parser.parse_args(argv)

    state = StateDir(resolve_state_dir(ns.state_dir))
    entries = state.entries()
    matches = [e for e in entries if ns.id in (e.id, str(e.port), e.model)]
    if not matches:
        matches = [e for e in entries if e.id.startswith(ns.id)]
    if len(matches) != 1:
        what = "no engine" if not matches else "several engines"
        known = ", ".join(f"{e.id} (port {e.port})" for e in entries) or "none running"
        print(f"deepinfer-engine stop: {what} match {ns.id!r}; launched here: {known}",
              file=sys.stderr)
        return 1
    entry = matches[0]
    timeout = ns.timeout if ns.timeout is not None else entry.stop_timeout_s + 15
    if entry.state == "orphaned":  # the supervisor died; stop vLLM's group ourselves
        asyncio.run(stop_unsupervised_group(entry.pgid, min(timeout, entry.stop_timeout_s)))
        state.remove(entry.id)
        print(f"stopped orphaned engine {entry.id} (process group {entry.pgid})")
        return 0
    try:
        os.kill(entry.pid, signal.SIGTERM)
    except ProcessLookupError:
        state.remove(entry.id)
        print(f"engine {entry.id} was not running")
        return 0
    if ns.no_wait:
        print(f"stopping engine {entry.id} (supervisor pid {entry.pid})")
        return 0
    deadline = time.monotonic() + timeout
    while pid_alive(entry.pid, entry.pid_start):
        if time.monotonic() > deadline:
            print(f"deepinfer-engine stop: engine {entry.id} still stopping after {timeout:g}s "
                  f"(supervisor pid {entry.pid}); log: {entry.log_file}", file=sys.stderr)
            return 1
        time.sleep(0.1)
    print(f"stopped engine {entry.id}")
    return 0


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "agent": agent_main,
    "gpus": gpus_main,
    "launch": launch_main,
    "list": list_main,
    "stop": stop_main,
}


DEPLOY_COMMANDS = ("deploy", "deployments", "scale", "undeploy", "hosts")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "sim":
        from .sim.main import main as sim_main

        return sim_main(rest)
    if command in COMMANDS:
        return COMMANDS[command](rest)
    if command in DEPLOY_COMMANDS:
        from .deploy_cli import main as deploy_main

        return deploy_main(command, rest)
    print(f"deepinfer-engine: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
