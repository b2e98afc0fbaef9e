"""Real processes for fault tests: `deepinfer-engine sim` and `deepinfer-router`
subprocesses on free loopback ports, their logs captured to files, always stopped."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def refuses_connections(port: int) -> bool:
    """Nothing accepts connections on 127.0.0.1:`port` (a router that has stopped)."""
    with socket.socket() as s:
        s.settimeout(0.5)
        try:
            s.connect(("127.0.0.1", port))
        except (ConnectionRefusedError, TimeoutError, ConnectionResetError):
            # a reset: the connection reached the accept queue just as the listener
            # closed, and the kernel dropped it; refused all the same
            return True
    return False


def console_script(name: str) -> str:
    """The installed console script beside this interpreter (a venv's bin/), else PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} is not installed (pip install -e .)")
    return found


class Proc:
    """One subprocess with its combined output in a log file."""

    def __init__(self, argv: list[str], log_path: Path, port: int) -> None:
        self.argv = argv
        self.port = port
        self.log_path = log_path
        self._log = open(log_path, "wb")  # closed in stop()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.popen = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, env=env,
            stdin=subprocess.DEVNULL,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    async def wait_healthy(self, within_s: float = 20.0) -> None:
        deadline = time.monotonic() + within_s
        async with aiohttp.ClientSession() as s:
            while True:
                if self.popen.poll() is not None:
                    raise AssertionError(
                        f"{self.argv[0]} exited with {self.popen.returncode}:\n{self.log_text()}"
                    )
                try:
                    async with s.get(self.url + "/health",
                                     timeout=aiohttp.ClientTimeout(total=1)) as resp:
                        if resp.status == 200:
                            return
                except (aiohttp.ClientError, TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError(f"{self.argv} not healthy in {within_s}s:\n"
                                         f"{self.log_text()}")
                await asyncio.sleep(0.05)

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    async def wait_exit(self, within_s: float) -> int:
        deadline = time.monotonic() + within_s
        while self.popen.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.argv[0]} still running after {within_s}s")
            await asyncio.sleep(0.02)
        return self.popen.returncode

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(10)
        self._log.close()


class Procs:
    """Starts sims and routers; `stop_all` kills whatever is left (fixture teardown)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.started: list[Proc] = []

    def sim(self, *args: str, port: int | None = None) -> Proc:
        port = port or free_port()
        argv = [console_script("deepinfer-engine"), "sim", "--host", "127.0.0.1",
                "--port", str(port), *args]
        proc = Proc(argv, self.tmp / f"sim-{port}.log", port)
        self.started.append(proc)
        return proc

    def router(self, *args: str, port: int | None = None) -> Proc:
        port = port or free_port()
        argv = [console_script("deepinfer-router"), "--host", "127.0.0.1",
                "--port", str(port), *args]
        proc = Proc(argv, self.tmp / f"router-{port}.log", port)
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.started:
            proc.stop()
