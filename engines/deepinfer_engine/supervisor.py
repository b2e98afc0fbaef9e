"""`deepinfer-engine launch`: reserve GPUs, start vLLM, wait for readiness, register, and
keep it running: restart with exponential backoff after crashes, except for failures a
retry cannot heal (out of memory, model not found, bad argument), which are reported with
the tail of the engine's log. SIGTERM/SIGINT: deregister first, then stop vLLM's whole
process group (SIGTERM, SIGKILL after --stop-timeout-s).

Exit codes: 0 stopped on request; 1 the engine failed (permanently, or too many restarts);
2 refused before starting (bad option, no GPU fits, no driver, port taken).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import aiohttp
import zmq

from deepinfer_router.shared.engine_record import EngineRecord, engine_id_for
from deepinfer_router.shared.log_setup import configure_logging

from .gpus import SelectionError, select_gpus
from .kv_relay import KvEventsPlan, KvEventsRelay, bind_address, plan_kv_events
from .launch_settings import LaunchSettings
from .launch_state import (
    LaunchEntry,
    StateDir,
    pid_alive,
    process_start_time,
    resolve_state_dir,
)
from .launcher import (
    DEFAULT_GPU_MEMORY_UTILIZATION,
    AdoptedProcess,
    EngineCommand,
    EngineExited,
    EngineProcess,
    LaunchError,
    become_subreaper,
    build_command,
    extra_flag,
    pipeline_parallel_size,
    port_free,
    read_capacity,
    run_bounded,
    scheduling_policy,
    spawn,
    stop_group,
    wait_ready,
)
from .nvml import GpuSource, NvmlUnavailable, open_gpu_source
from .registrar import BackgroundRegistration

log = logging.getLogger("deepinfer.engine")

TAIL_LINES = 40

# --- failure classification --------------------------------------------------------------

# Messages vLLM, PyTorch, transformers and huggingface_hub print for failures that come
# back identically on every retry. Anything else (a segfault, NCCL timeout, a killed
# worker) is worth a restart.
PERMANENT_FAILURES: list[tuple[str, re.Pattern[str]]] = [
    ("out of memory", re.compile(
        r"OutOfMemoryError|CUDA out of memory|CUDA error: out of memory"
        r"|less than desired GPU memory utilization|No available memory for the cache blocks"
        r"|larger than the available KV cache memory"
        r"|larger than the maximum number of tokens that can be stored in KV cache")),
    ("model not found", re.compile(
        r"Repository Not Found for url|RepositoryNotFoundError|GatedRepoError"
        r"|Cannot access gated repo|is not a local folder and is not a valid model identifier"
        r"|Invalid repository ID or local directory specified"
        r"|does not appear to have a file named config\.json|RevisionNotFoundError"
        # offline (HF_HUB_OFFLINE): a local path that does not exist, a hub id not cached
        r"|HFValidationError: Repo id must be|LocalEntryNotFoundError"
        r"|Cannot find an appropriate cached snapshot folder")),
    ("bad argument", re.compile(
        r"^\S*(vllm|api_server\.py|serve)\S*: error: |unrecognized arguments:"
        r"|error: argument --|validation errors? for (\w*Config|EngineArgs|\w*Args)",
        re.MULTILINE)),
]


def classify_failure(log_text: str, returncode: int | None = None) -> tuple[str, str] | None:
    """(kind, the matching line) for a failure a restart will not heal, else None."""
    for kind, pattern in PERMANENT_FAILURES:
        found = list(pattern.finditer(log_text))
        if found:
            m = found[-1]  # the last one: usually the summary line of the final exception
            start = log_text.rfind("\n", 0, m.start()) + 1
            end = log_text.find("\n", m.end())
            return kind, log_text[start: end if end >= 0 else None].strip()
    if returncode == 2:  # argparse's exit status for a usage error
        return "bad argument", "engine exited with code 2 (usage error)"
    return None


def read_from(path: Path, offset: int, limit: int = 1 << 20) -> str:
    """The log written since `offset` (at most the last `limit` bytes)."""
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(offset, size - limit))
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


def tail(text: str, lines: int = TAIL_LINES) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


# --- the plan: what to run where -----------------------------------------------------------


@dataclass
class Plan:
    entry: LaunchEntry
    command: EngineCommand
    probe_base: str  # where we check readiness (loopback when listening on all addresses)
    advertise_url: str
    log_path: Path
    kv_events: KvEventsPlan | None = None  # the KV event feed's sockets (kv_relay.py)


def tokenizer_dir(s: LaunchSettings) -> str | None:
    """The local directory vLLM loads the tokenizer from (its --tokenizer, else MODEL),
    when it is one: a Hugging Face id has none a router could read."""
    path = extra_flag(s.extra_args, "--tokenizer") or s.model
    if path and os.path.isdir(path):
        return os.path.abspath(path)
    return None


def _kv_events_plan(
    s: LaunchSettings, state: StateDir, engine_id: str, advertise: str,
    entries: list[LaunchEntry],
) -> KvEventsPlan | None:
    """Two free ports on the advertised address for the feed relay and vLLM's replay
    socket, unless --kv-events off or the extra args configure events themselves."""
    if s.kv_events == "off" or extra_flag(s.extra_args, "--kv-events-config") is not None:
        return None
    address = bind_address(urlsplit(advertise).hostname or "127.0.0.1")
    taken = {p for e in entries for p in (e.port, *e.kv_ports)} | {s.port}
    ports: list[int] = []
    with contextlib.ExitStack() as held:  # hold each port while picking the next
        for _ in range(20):
            if len(ports) == 2:
                break
            sock = held.enter_context(socket.socket(
                socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM))
            try:
                sock.bind((address, 0))
            except OSError as exc:
                raise LaunchError(f"cannot bind the KV event feed on {address}: {exc} "
                                  "(--kv-events off to run without it)") from None
            port = int(sock.getsockname()[1])
            if port not in taken:
                ports.append(port)
    if len(ports) < 2:
        raise LaunchError(f"no free ports on {address} for the KV event feed")
    return plan_kv_events(state.path, engine_id, address, (ports[0], ports[1]))


def local_base(host: str, port: int) -> str:
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def default_advertise_url(host: str, port: int) -> str:
    if host in ("0.0.0.0", "", "::"):
        host = socket.getfqdn() or socket.gethostname()
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def make_plan(
    s: LaunchSettings,
    state: StateDir,
    gpu_source: Callable[[], GpuSource] = open_gpu_source,
    *,
    build: Callable[[LaunchSettings, str | None, int], EngineCommand] = build_command,
    entry_extra: dict[str, object] | None = None,
) -> Plan:
    """Select GPUs and record the launch under the host lock. Raises LaunchError,
    SelectionError or NvmlUnavailable to refuse. `build` makes the command (the agent's
    docker replicas differ); `entry_extra` adds fields to the state entry."""
    assert s.model
    advertise = (s.advertise_url or default_advertise_url(s.host, s.port)).rstrip("/")
    engine_id = engine_id_for(advertise)
    pp = pipeline_parallel_size(s.extra_args)
    mem_util = s.gpu_memory_utilization or DEFAULT_GPU_MEMORY_UTILIZATION
    log_path = Path(s.log_file) if s.log_file else state.logs / f"{engine_id}.log"
    holder: dict[str, Any] = {}

    def factory(entries: list[LaunchEntry]) -> LaunchEntry:
        for e in entries:
            if e.id == engine_id or e.port == s.port:
                raise LaunchError(
                    f"engine {e.id} ({e.model}, port {e.port}) is already launched on this host "
                    f"(supervisor pid {e.pid}); stop it first: deepinfer-engine stop {e.id}"
                )
        if not port_free(s.host, s.port):
            raise LaunchError(f"port {s.port} on {s.host} is already in use; choose --port")
        indices: list[int] = []
        uuids: list[str] = []
        if s.gpus == "none":
            tp, cvd = s.tp or 1, None
        else:
            named = len(s.gpus.split(",")) if s.gpus != "auto" else None
            tp = s.tp or (max(1, named // pp) if named else 1)
            reserved = {u for e in entries for u in e.gpus}
            sel = select_gpus(gpu_source().snapshot(), s.gpus, tp * pp, mem_util, reserved)
            indices, uuids, cvd = sel.indices, sel.uuids, sel.cuda_visible_devices
        kv = _kv_events_plan(s, state, engine_id, advertise, entries)
        cmd = build(s, cvd, tp)
        if kv is not None:
            cmd.argv += ["--kv-events-config", kv.vllm_config()]
        holder["cmd"], holder["kv"] = cmd, kv
        return LaunchEntry(
            id=engine_id, model=cmd.served_name, url=advertise, port=s.port, pid=os.getpid(),
            pid_start=process_start_time(os.getpid()), gpus=uuids, gpu_indices=indices,
            started_at=time.time(), log_file=str(log_path), registry=s.registry,
            stop_timeout_s=s.stop_timeout_s, command=cmd.argv,
            kv_ports=[int(p.rsplit(":", 1)[1]) for p in (
                kv.public.endpoint, kv.public.replay_endpoint or "") if p] if kv else [],
            **(entry_extra or {}),
        )

    entry = state.claim(factory)
    return Plan(entry=entry, command=holder["cmd"], probe_base=local_base(s.host, s.port),
                advertise_url=advertise, log_path=log_path, kv_events=holder["kv"])


# --- supervision -------------------------------------------------------------------------


class Supervisor:
    """Runs one engine until asked to stop (`request_stop`) or it fails for good.

    `launch` runs one per process; the agent runs several in one process (`in_agent`):
    then the engines outlive a crashed agent (no parent-death signal) so its next run can
    adopt them (`adopt`: the entry of an engine still running), nothing is reaped but our
    own children, `on_state` reports each state change, and a stop first drains the
    engine (deregistered, in-flight requests finish, up to `drain_timeout_s`)."""

    def __init__(
        self,
        s: LaunchSettings,
        plan: Plan,
        state: StateDir,
        logf: TextIO,
        *,
        in_agent: bool = False,
        on_state: Callable[[str], None] | None = None,
        drain_timeout_s: float = 0.0,
        adopt: LaunchEntry | None = None,
    ) -> None:
        self.s = s
        self.logf = logf
        self.plan = plan
        self.state = state
        self.stopping = asyncio.Event()
        self.restarts = 0
        self.ready_at: float | None = None  # when the current run became ready
        self.in_agent = in_agent
        self._on_state = on_state
        self.drain_timeout_s = drain_timeout_s
        self._adopt = adopt
        self.drain_on_stop = True  # the agent clears it to stop at once (self-fencing)
        self.last_error: str | None = None  # why the last run ended badly, for status
        self.log_tail: str | None = None
        self.record: EngineRecord | None = None
        self._stop_timeout_s: float | None = None
        self._at_once = asyncio.Event()  # a stop without drain was asked for

    async def _drain_cut(self, seconds: float) -> bool:
        """Wait up to `seconds`; True as soon as a stop without drain is asked for."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._at_once.wait(), timeout=seconds)
        return self._at_once.is_set()

    def request_stop(self, drain: bool = True, timeout_s: float | None = None) -> None:
        """Stop (draining first unless `drain` is False); `timeout_s` shortens the wait
        between SIGTERM and SIGKILL (self-fencing has little time)."""
        self.drain_on_stop = self.drain_on_stop and drain
        if not drain:
            self._at_once.set()
        if timeout_s is not None:
            self._stop_timeout_s = min(self._stop_timeout_s or timeout_s, timeout_s)
        self.stopping.set()

    def _update(self, **changes: object) -> None:
        self.state.update(self.plan.entry.id, **changes)
        if self._on_state is not None and "state" in changes:
            self._on_state(str(changes["state"]))

    def _registration(self) -> BackgroundRegistration | None:
        if not self.s.registry:
            return None
        return BackgroundRegistration(self.s.make_registrar)

    async def _wait_stop(self, seconds: float) -> bool:
        """Sleep, waking early on stop; True if stopping."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), timeout=seconds)
        return self.stopping.is_set()

    async def run(self) -> int:
        if not self.in_agent:
            become_subreaper()
        backoff = self.s.restart_backoff_s
        while True:
            self.ready_at = None
            code = await self._attempt(self.logf)
            if code is not None:
                return code
            # A crash worth a restart. Only a healthy run (uptime since readiness) resets
            # the count: a start that times out or dies while loading never does.
            if (self.ready_at is not None
                    and time.monotonic() - self.ready_at >= self.s.restart_reset_s):
                self.restarts, backoff = 0, self.s.restart_backoff_s
            if self.restarts >= self.s.max_restarts:
                log.error("engine failed %d time(s) in a row; giving up (--max-restarts %d)",
                          self.restarts + 1, self.s.max_restarts)
                self.last_error = self.last_error or (
                    f"failed {self.restarts + 1} time(s) in a row")
                self._update(state="failed")
                return 1
            self.restarts += 1
            self._update(state="restarting", restarts=self.restarts, pgid=0)
            log.warning("restarting the engine in %.1fs (restart %d of at most %d)",
                        backoff, self.restarts, self.s.max_restarts)
            if await self._wait_stop(backoff):
                return 0
            backoff = min(max(backoff * 2, 0.1), self.s.restart_backoff_max_s)

    def on_signal(self, sig: int) -> None:
        if not self.stopping.is_set():
            log.info("%s received: stopping", signal.Signals(sig).name)
        self.stopping.set()

    async def _start(self, logf: TextIO) -> tuple[EngineProcess, int] | None:
        """Start the engine (or take over the one to adopt): (process, process group)."""
        p = self.plan
        if self._adopt is not None:
            entry, self._adopt = self._adopt, None
            if entry.pgid and pid_alive(entry.pgid, entry.pgid_start):
                log.info("adopting engine %s (process group %d) started by an earlier run",
                         entry.id, entry.pgid)
                self._update(pgid=entry.pgid, pgid_start=entry.pgid_start, state="starting")
                return AdoptedProcess(entry.pgid, entry.pgid_start), entry.pgid
        if p.command.cleanup_argv:  # e.g. a container of an earlier run still there
            await run_bounded(p.command.cleanup_argv, 10.0, log.warning)
        if not await self._port_released():
            log.warning("port %d still in use; trying anyway", p.entry.port)
        logf.write(f"\n=== deepinfer-engine {time.strftime('%Y-%m-%d %H:%M:%S')}: starting "
                   f"{' '.join(p.command.argv)}\n")
        try:
            proc = await spawn(p.command, logf, die_with_parent=not self.in_agent)
        except LaunchError as exc:
            log.error("%s", exc)
            self.last_error = str(exc)
            self._update(state="failed")
            return None
        pgid = proc.pid  # leader of its own new session/process group
        self._update(pgid=pgid, pgid_start=process_start_time(pgid), state="starting")
        log.info("engine started (pid %d), waiting for readiness at %s; log: %s",
                 proc.pid, p.probe_base, p.log_path)
        return proc, pgid

    async def _attempt(self, logf: TextIO) -> int | None:
        """One run of the engine. An exit code to finish with, or None to restart."""
        p = self.plan
        offset = logf.tell()
        started = await self._start(logf)
        if started is None:
            return 1
        proc, pgid = started
        relay = self._start_relay()
        registration = self._registration()
        try:
            outcome = await self._run_started(proc, registration)
        finally:
            if relay is not None:
                await asyncio.to_thread(relay.stop)
            # Deregister before the engine goes away (and drain), except when stopping
            # at once (self-fencing): then the engine goes first, within the budget, and
            # the deregistration (to a store that may be unreachable) after.
            at_once = self.stopping.is_set() and not self.drain_on_stop
            if registration is not None and not at_once:
                await registration.stop()
            if self.stopping.is_set() and self.ready_at is not None and self.drain_on_stop:
                await self._drain()
            # Always, even after the leader exited: its workers may still hold the GPUs.
            timeout = self.s.stop_timeout_s if self.stopping.is_set() else min(
                self.s.stop_timeout_s, 5.0)
            if self._stop_timeout_s is not None:
                timeout = min(timeout, self._stop_timeout_s)
            await stop_group(proc, pgid, timeout, log.warning,
                             stop_argv=p.command.stop_argv, reap=not self.in_agent,
                             cleanup_argv=p.command.cleanup_argv)
            if registration is not None and at_once:
                await registration.stop()
        if outcome == "stopped":
            log.info("engine stopped")
            return 0
        text = read_from(p.log_path, offset)
        self.log_tail = tail(text)
        if outcome == "exited":
            failure = classify_failure(text, proc.returncode)
            log.error("engine exited with code %s; last lines of %s:\n%s",
                      proc.returncode, p.log_path, tail(text))
            self.last_error = f"engine exited with code {proc.returncode}"
            if failure is not None:
                kind, line = failure
                log.error("permanent failure (%s), not restarting: %s", kind, line)
                self.last_error = f"{kind}: {line}"
                self._update(state="failed")
                return 1
        else:
            self.last_error = f"engine {outcome}"
        return None

    def _start_relay(self) -> KvEventsRelay | None:
        """The KV event feed on the advertised address (kv_relay.py); without it the
        engine still serves and routers use their approximate index for it."""
        if self.plan.kv_events is None:
            return None
        relay = KvEventsRelay(self.plan.kv_events)
        try:
            relay.start()
        except zmq.ZMQError as exc:
            log.warning("KV event feed not published (%s): routers will estimate this "
                        "engine's cache", exc)
            self.plan.kv_events = None
            return None
        return relay

    async def _drain(self) -> None:
        """Deregistered already: give routers a moment to notice, then wait until the
        engine has no running or waiting request (vLLM's gauges), up to the drain timeout."""
        if self.drain_timeout_s <= 0:
            return
        self._update(state="stopping")
        deadline = time.monotonic() + self.drain_timeout_s
        # Routers see the `down` hint meanwhile; a stop at once cuts the drain short.
        if await self._drain_cut(min(1.0, self.drain_timeout_s)):
            return
        url = f"{self.plan.probe_base}/metrics"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            while time.monotonic() < deadline:
                busy = await _requests_in_engine(session, url)
                if not busy or await self._drain_cut(0.2):
                    return
        log.warning("engine still busy after the %gs drain: stopping it",
                    self.drain_timeout_s)

    async def _port_released(self, timeout_s: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while not port_free(self.s.host, self.s.port):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.2)
        return True

    async def _run_started(
        self, proc: EngineProcess, registration: BackgroundRegistration | None
    ) -> str:
        """'stopped' (on request), 'exited' (crash), 'unhealthy' or 'timeout'."""
        p = self.plan
        ready_task = asyncio.create_task(wait_ready(
            proc, p.probe_base, p.command.served_name, timeout_s=self.s.ready_timeout_s,
            check_completion=self.s.ready_check_completion,
            on_progress=lambda m: log.info("still waiting for the engine: %s", m)))
        stop_task = asyncio.create_task(self.stopping.wait())
        try:
            await asyncio.wait({ready_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_task.cancel()
        if not ready_task.done():
            ready_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await ready_task
            return "stopped"
        try:
            info = ready_task.result()
        except EngineExited:
            return "exited"
        except TimeoutError as exc:
            log.error("%s; see %s", exc, p.log_path)
            self.last_error = str(exc)
            return "timeout"
        capacity = await read_capacity(p.probe_base, p.command.served_name, info.models,
                                       self.s.extra_args)
        labels = {"host": socket.gethostname(), "device": "cpu" if self.s.gpus == "none"
                  else "gpu", **self.s.label_dict()}
        if self.s.gpus == "none":
            labels["gpus"] = "none"
        if scheduling_policy(self.s) == "priority":  # routers then pass request priorities
            labels["scheduling-policy"] = "priority"
        record = EngineRecord(
            url=p.advertise_url, models=[p.command.served_name], capacity=capacity,
            labels=labels, gpus=p.entry.gpus, version=info.version, started_at=time.time(),
            kv_events=p.kv_events.public if p.kv_events is not None else None,
            # Routers key the feed by token ids: tell them where the tokenizer is.
            tokenizer=tokenizer_dir(self.s) if p.kv_events is not None else None,
        )
        self.record = record
        if registration is not None:
            registration.start(record)
        self.ready_at = time.monotonic()
        self._update(state="ready")
        log.info("engine %s ready at %s (model %s, GPUs %s, kv_blocks %s)", record.id,
                 p.advertise_url, p.command.served_name,
                 ",".join(map(str, p.entry.gpu_indices)) or "none", capacity.kv_blocks)
        return await self._watch(proc)

    async def _watch(self, proc: EngineProcess) -> str:
        """Until the engine exits, hangs (health checks fail) or we are asked to stop."""
        failures = 0
        url = f"{self.plan.probe_base}/health"
        timeout = aiohttp.ClientTimeout(total=max(2.0, self.s.health_interval_s))
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                wait_proc = asyncio.create_task(proc.wait())
                wait_stop = asyncio.create_task(self.stopping.wait())
                done, pending = await asyncio.wait(
                    {wait_proc, wait_stop}, timeout=self.s.health_interval_s,
                    return_when=asyncio.FIRST_COMPLETED)
                for t in pending:
                    t.cancel()
                if wait_stop in done:
                    return "stopped"
                if wait_proc in done:
                    return "exited"
                try:
                    async with session.get(url, allow_redirects=False) as resp:
                        ok = resp.status == 200
                except (TimeoutError, aiohttp.ClientError):
                    ok = False
                failures = 0 if ok else failures + 1
                if failures >= self.s.health_failures:
                    log.error("engine failed %d health checks in a row: restarting it", failures)
                    return "unhealthy"


async def _supervise(supervisor: Supervisor) -> int:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, supervisor.on_signal, sig)
    return await supervisor.run()


async def _requests_in_engine(session: aiohttp.ClientSession, url: str) -> bool:
    """Whether vLLM's /metrics shows a running or waiting request (False when it cannot
    be read: nothing to wait for then)."""
    try:
        async with session.get(url, allow_redirects=False) as resp:
            if resp.status != 200:
                return False
            text = await resp.text()
    except (TimeoutError, aiohttp.ClientError):
        return False
    for line in text.splitlines():
        if line.startswith(("vllm:num_requests_running", "vllm:num_requests_waiting")):
            with contextlib.suppress(ValueError, IndexError):
                if float(line.rsplit(" ", 1)[1]) > 0:
                    return True
    return False


def run_launch(s: LaunchSettings, gpu_source: Callable[[], GpuSource] = open_gpu_source) -> int:
    configure_logging(s.log_level)
    state = StateDir(resolve_state_dir(s.state_dir))
    try:
        plan = make_plan(s, state, gpu_source)
    except (LaunchError, SelectionError) as exc:
        print(f"deepinfer-engine launch: {exc}", file=sys.stderr)
        return 2
    except NvmlUnavailable as exc:
        print(f"deepinfer-engine launch: {exc}; use --gpus none to run without GPUs",
              file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"deepinfer-engine launch: state directory {state.path}: {exc}", file=sys.stderr)
        return 2
    log.info("launching %s as %s on %s", s.model, plan.entry.id,
             ("GPUs " + ",".join(map(str, plan.entry.gpu_indices))) if plan.entry.gpus
             else "no GPU")
    try:
        plan.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(plan.log_path, "a", buffering=1) as logf:
            return asyncio.run(_supervise(Supervisor(s, plan, state, logf)))
    finally:
        state.remove(plan.entry.id, pid=os.getpid())
