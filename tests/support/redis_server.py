"""A real `redis-server` for tests: free loopback port, temp dir, no persistence.

`kill()` is SIGKILL (a crash), `stop()` a clean shutdown, `restart()` starts a fresh,
empty server (new run_id) on the same port, like a restarted Redis in production.
`pause()`/`resume()` are SIGSTOP/SIGCONT: a hung Redis that comes back with its data (and
its run_id); clients block until their socket timeouts meanwhile.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

REDIS_SERVER = "redis-server"


def redis_server_path() -> str | None:
    return shutil.which(REDIS_SERVER) or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One redis-server process. Usable as a context manager."""

    def __init__(
        self,
        *,
        password: str | None = None,
        port: int | None = None,
        extra_args: list[str] | None = None,
        start: bool = True,
    ) -> None:
        binary = redis_server_path()
        if binary is None:
            raise RuntimeError("redis-server not found")
        self.binary = binary
        self.password = password
        self.port = port or free_port()
        self.extra_args = list(extra_args or [])
        self._dir = Path(tempfile.mkdtemp(prefix="deepinfer-redis-"))
        self._proc: subprocess.Popen[bytes] | None = None
        self.paused = False
        self._log = self._dir / "redis.log"
        if start:
            self.start()

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout_s: float = 10.0) -> None:
        if self.running:
            return
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self._dir),
            "--logfile", str(self._log),
            "--protected-mode", "no",
        ]
        if self.password:
            args += ["--requirepass", self.password]
        args += self.extra_args
        deadline = time.monotonic() + timeout_s
        while True:
            # The port can linger briefly after a kill; retry the bind until the deadline.
            self._proc = subprocess.Popen(
                args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self._dir
            )
            if self._wait_ready(deadline):
                return
            self._terminate(signal.SIGKILL)
            if time.monotonic() >= deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}: "
                                   f"{self._log_tail()}")
            time.sleep(0.1)

    def _wait_ready(self, deadline: float) -> bool:
        auth = f"AUTH {self.password}\r\n".encode() if self.password else b""
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(auth + b"PING\r\n")
                    data = b""
                    while b"PONG" not in data:
                        chunk = sock.recv(256)
                        if not chunk:
                            break
                        data += chunk
                    if b"PONG" in data:
                        return True
            except OSError:
                pass
            time.sleep(0.02)
        return False

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self._log.read_text()[-2000:]
        return ""

    def _terminate(self, sig: signal.Signals) -> None:
        proc, self._proc = self._proc, None
        was_paused, self.paused = self.paused, False
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            if was_paused:  # a stopped process acts on SIGTERM only once continued
                proc.send_signal(signal.SIGCONT)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def pause(self) -> None:
        """SIGSTOP: the process hangs (connections are still accepted by the kernel, nothing
        is answered, no key expires until it runs again). Always pair with resume()."""
        if not self.running:
            raise RuntimeError("redis-server is not running")
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        """SIGCONT; a no-op unless paused (so it is safe in a `finally`)."""
        if self.paused and self.running:
            assert self._proc is not None
            self._proc.send_signal(signal.SIGCONT)
        self.paused = False

    def kill(self) -> None:
        """SIGKILL: a crash, nothing saved (nothing is saved anyway)."""
        self._terminate(signal.SIGKILL)

    def stop(self) -> None:
        self._terminate(signal.SIGTERM)

    def restart(self) -> None:
        """Kill and start again on the same port: an empty Redis with a new run_id."""
        self.kill()
        self.start()

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
