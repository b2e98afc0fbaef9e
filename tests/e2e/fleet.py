"""A real fleet for the end-to-end tests: a `deepinfer-router` subprocess and vLLM engines
(CPU build) started by real `deepinfer-engine launch --gpus none` subprocesses that
register with the router's embedded registry. Everything runs on loopback ports; every
process is stopped at the end, and `assert_no_leftovers` checks that nothing of vLLM
outlived it.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepinfer_engine.launch_state import LaunchEntry, StateDir, group_alive
from deepinfer_router.shared.engine_record import engine_id_for
from tests.e2e.vllm_cmd import cpu_env, serve_flags
from tests.support.procs import console_script, free_port

MODEL = "tiny-llama"
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # Between fork and exec in the child: if pytest dies, the supervisor gets SIGTERM and
    # stops its vLLM in turn (launcher.py does the same one level down).
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def http_json(
    method: str, url: str, body: Any = None, timeout: float = 30.0,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, dict[str, str]]:
    """(status, parsed JSON body or text, headers) without raising on HTTP errors."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw, headers = resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        status, raw, headers = exc.code, exc.read(), dict(exc.headers)
    try:
        return status, json.loads(raw), headers
    except ValueError:
        return status, raw.decode(errors="replace"), headers


def get_text(url: str, timeout: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return str(resp.read().decode())


def metric_sum(text: str, name: str) -> float:
    """Sum of every sample of counter/gauge `name` (all label sets)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")):
            total += float(line.rsplit(" ", 1)[1])
    return total


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def processes_with(*needles: str) -> list[int]:
    """Pids whose command line contains every needle (not this process)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if all(n in cmdline for n in needles):
            found.append(int(proc.name))
    return found


class Router:
    """`deepinfer-router` as a subprocess on a free loopback port."""

    def __init__(self, tmp: Path, *args: str, name: str = "router") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / f"{name}-{self.port}.log"
        self._log = open(self.log_path, "wb")  # closed in stop()
        argv = [console_script("deepinfer-router"), "--host", "127.0.0.1", "--port",
                str(self.port), "--health-interval-s", "1", "--scrape-interval-s", "0.25",
                "--log-level", "warning", *args]
        self.popen = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent,
                                      env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def wait_healthy(self, within_s: float = 30.0) -> None:
        deadline = time.monotonic() + within_s
        while True:
            if self.popen.poll() is not None:
                raise AssertionError(f"router exited with {self.popen.returncode}:\n"
                                     f"{tail(self.log_path)}")
            with contextlib.suppress(OSError):
                if http_json("GET", self.url + "/health", timeout=2)[0] == 200:
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"router not healthy in {within_s}s:\n{tail(self.log_path)}")
            time.sleep(0.1)

    def engines(self) -> list[dict[str, Any]]:
        status, body, _ = http_json("GET", self.url + "/admin/engines", timeout=10)
        assert status == 200, body
        engines = body.get("engines", []) if isinstance(body, dict) else body
        return [e for e in engines if isinstance(e, dict)]

    def wait_engines(self, urls: Sequence[str], within_s: float = 30.0) -> None:
        """Until the router lists every engine in `urls` and /ready answers 200."""
        deadline = time.monotonic() + within_s
        while True:
            with contextlib.suppress(OSError, AssertionError):
                known = {e.get("url", "").rstrip("/") for e in self.engines()}
                if set(urls) <= known and http_json("GET", self.url + "/ready")[0] == 200:
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"router does not list {urls} after {within_s}s")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        self._log.close()


@dataclass
class Engine:
    """One `deepinfer-engine launch --gpus none` subprocess and the vLLM it supervises."""

    port: int
    launch: subprocess.Popen[bytes]
    out_path: Path  # the supervisor's own output
    log_path: Path  # vLLM's output
    state: StateDir
    pgids: set[int] = field(default_factory=set)  # every vLLM process group seen

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def id(self) -> str:
        return engine_id_for(self.url)

    def entry(self) -> LaunchEntry | None:
        for e in self.state.entries():
            if e.port == self.port:
                if e.pgid:
                    self.pgids.add(e.pgid)
                return e
        return None

    def diagnostics(self) -> str:
        return (f"--- launch output ({self.out_path}):\n{tail(self.out_path)}\n"
                f"--- vLLM log ({self.log_path}):\n{tail(self.log_path)}")

    def vllm_processes(self, model_dir: Path) -> list[int]:
        """Live processes of this engine: its process groups, and any API server serving
        `model_dir` on this port (its command line names both)."""
        pids = set(processes_with(str(model_dir), f"--port {self.port} "))
        for pgid in self.pgids:
            if group_alive(pgid):
                pids.add(pgid)
        return sorted(pids)

    def terminate(self, within_s: float = 60.0) -> int:
        """SIGTERM the supervisor (as `deepinfer-engine stop` does) and wait for its exit
        code; SIGKILL everything of it after `within_s`."""
        self.entry()  # remember the current process group
        if self.launch.poll() is None:
            self.launch.send_signal(signal.SIGTERM)
        try:
            return self.launch.wait(within_s)
        except subprocess.TimeoutExpired:
            self.launch.kill()
            for pgid in self.pgids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)
            self.launch.wait(10)
            raise AssertionError(f"launch did not stop within {within_s}s\n"
                                 f"{self.diagnostics()}") from None


def launch_engine(
    tmp: Path, model_dir: Path, registry: str, extra: Sequence[str] = ()
) -> Engine:
    port = free_port()
    state = StateDir(tmp / "state")
    out_path = tmp / f"launch-{port}.out"
    log_path = tmp / f"vllm-{port}.log"
    argv = [console_script("deepinfer-engine"), "launch", str(model_dir), "--gpus", "none",
            "--host", "127.0.0.1", "--port", str(port), "--served-model-name", MODEL,
            "--registry", registry, "--state-dir", str(state.path),
            "--log-file", str(log_path), "--heartbeat-s", "1", "--stop-timeout-s", "15",
            "--ready-timeout-s", "480", "--restart-backoff-s", "1", *extra,
            # Cached-token counts in `usage` (the KV event test compares them).
            "--", *serve_flags(), "--enable-prompt-tokens-details"]
    with open(out_path, "wb") as out:
        # Popen from the main thread: PDEATHSIG fires when the forking *thread* exits.
        launch = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, env=cpu_env(),
                                  preexec_fn=_die_with_parent)
    return Engine(port=port, launch=launch, out_path=out_path, log_path=log_path, state=state)


@dataclass
class Fleet:
    tmp: Path
    model_dir: Path
    router: Router  # kv-aware, embedded registry: the engines register here
    engines: list[Engine]
    started_s: float  # seconds from launch to both engines registered

    def engine(self, engine_id: str) -> Engine:
        for e in self.engines:
            if e.id == engine_id:
                return e
        raise KeyError(engine_id)

    def live_engines(self) -> list[Engine]:
        return [e for e in self.engines if e.launch.poll() is None]


def wait_registered(router: Router, engines: Sequence[Engine], within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while True:
        for e in engines:
            e.entry()
            if e.launch.poll() is not None:
                raise AssertionError(f"launch on port {e.port} exited with "
                                     f"{e.launch.returncode}\n{e.diagnostics()}")
        with contextlib.suppress(OSError, AssertionError):
            known = {r.get("url", "").rstrip("/") for r in router.engines()}
            if {e.url for e in engines} <= known:
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"engines not registered after {within_s}s\n"
                                 + "\n".join(e.diagnostics() for e in engines))
        time.sleep(0.5)


def assert_no_leftovers(engines: Sequence[Engine], model_dir: Path) -> None:
    left = {e.port: e.vllm_processes(model_dir) for e in engines}
    left = {port: pids for port, pids in left.items() if pids}
    assert not left, f"vLLM processes left behind (port: pids): {left}"
