"""The parent of `--workers N`: binds the port once and keeps N workers serving it.

Each worker is this program again (a fresh interpreter, so nothing of the parent's state
is shared by accident) with the listening socket inherited and its slot in the
environment. The kernel hands each new connection to whichever worker accepts first, so
an idle worker takes more. A worker that dies is started again (after a pause that grows
while it keeps dying at once); SIGTERM or SIGINT stops listening at once (the parent's
copy of the socket is closed with the workers'), is passed to every worker, which
drains as a single router does, and the parent exits when they have.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import FrameType

from .slot import SLOT_ENV, WorkerSlot

log = logging.getLogger("deepinfer.workers")

_POLL_S = 0.1
_PR_SET_PDEATHSIG = 1
_RESTART_PAUSE_S = (0.2, 10.0)  # first pause, longest pause
_STABLE_S = 10.0  # a worker that ran this long is not crash-looping
_GIVE_UP_AFTER = 5  # fast failures in a row of every worker


def _term_when_parent_dies() -> None:
    """In the child before exec (the parent has no threads): SIGTERM when the parent
    dies (Linux prctl PR_SET_PDEATHSIG; elsewhere workers watch their parent pid)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def listen(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """The one listening socket every worker accepts on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6 and host == "::":
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


class _Worker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.pause = _RESTART_PAUSE_S[0]
        self.restart_at = 0.0
        self.restarts = 0
        self.fast_failures = 0  # exits in a row within _STABLE_S of starting


class Supervisor:
    def __init__(self, argv: list[str], host: str, port: int, count: int,
                 grace_s: float = 30.0) -> None:
        self.argv = argv
        self.count = count
        self.sock = listen(host, port)
        self.port = self.sock.getsockname()[1]
        self.directory = Path(tempfile.mkdtemp(prefix="deepinfer-workers-"))  # 0700
        self.epoch = uuid.uuid4().hex[:12]
        self.workers = [_Worker(i) for i in range(count)]
        self.stopping = False
        self.forced = False
        self.grace_s = grace_s

    def slot(self, index: int) -> WorkerSlot:
        return WorkerSlot(index, self.count, self.sock.fileno(), self.epoch, self.directory)

    def spawn(self, worker: _Worker) -> None:
        env = dict(os.environ, **{SLOT_ENV: self.slot(worker.index).encode()})
        with contextlib.suppress(FileNotFoundError):  # a dead worker's socket file
            self.slot(worker.index).own_socket.unlink()
        worker.proc = subprocess.Popen(
            [sys.executable, "-m", "deepinfer_router.cli", *self.argv],
            env=env, pass_fds=(self.sock.fileno(),),
            # a worker never outlives the parent (killed, crashed): it drains and exits
            preexec_fn=_term_when_parent_dies,
        )
        worker.started = time.monotonic()
        log.info("worker %d started (pid %d)", worker.index, worker.proc.pid)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self.stopping:  # a second signal: stop waiting for the drain
            self.forced = True
            return
        log.info("%s: stopping the workers", signal.Signals(signum).name)
        self.stopping = True

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        log.info("listening on port %d with %d workers", self.port, self.count)
        for worker in self.workers:
            self.spawn(worker)
        try:
            while not self.stopping:
                if self._tend(time.monotonic()):
                    log.error("every worker keeps failing at start; giving up")
                    self.stopping = True
                    self._stop()
                    return 1
                time.sleep(_POLL_S)
            return self._stop()
        finally:
            with contextlib.suppress(OSError):
                self.sock.close()
            for path in self.directory.glob("*"):
                with contextlib.suppress(OSError):
                    path.unlink()
            with contextlib.suppress(OSError):
                self.directory.rmdir()

    def _tend(self, now: float) -> bool:
        """Restart workers that died (not while stopping). True when every worker has
        failed at start `_GIVE_UP_AFTER` times in a row (a bad setting, a port or path
        it cannot use): better to exit, as one router process would, than to hold the
        port open with no one serving it."""
        for worker in self.workers:
            proc = worker.proc
            if proc is not None and proc.poll() is not None:
                ran = now - worker.started
                stable = ran >= _STABLE_S
                worker.pause = (_RESTART_PAUSE_S[0] if stable
                                else min(worker.pause * 2, _RESTART_PAUSE_S[1]))
                worker.fast_failures = 0 if stable else worker.fast_failures + 1
                worker.restart_at = now + worker.pause
                worker.restarts += 1
                worker.proc = None
                log.warning("worker %d (pid %d) exited with %s after %.1fs; restarting in "
                            "%.1fs", worker.index, proc.pid, proc.returncode, ran, worker.pause)
            if worker.proc is None and now >= worker.restart_at:
                try:
                    self.spawn(worker)
                except OSError as exc:  # out of processes or memory: try again later
                    log.error("cannot start worker %d: %s", worker.index, exc)
                    worker.fast_failures += 1
                    worker.restart_at = now + _RESTART_PAUSE_S[1]
        return all(w.fast_failures >= _GIVE_UP_AFTER for w in self.workers)

    def _stop(self) -> int:
        # Stop accepting at once: the parent's copy would keep the port open (and let
        # connections queue that no worker will take) while the workers drain.
        self.sock.close()
        procs = [w.proc for w in self.workers if w.proc is not None]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        # Each drains for up to --shutdown-grace-s; past it (and a margin), or at a
        # second signal, what is left is killed.
        deadline = time.monotonic() + self.grace_s + 10.0
        failed = 0
        for proc in procs:
            while proc.poll() is None:
                if self.forced or time.monotonic() > deadline:
                    log.warning("worker pid %d did not stop in time: killing it", proc.pid)
                    proc.kill()
                    proc.wait()
                    break
                time.sleep(_POLL_S)
            failed += proc.returncode not in (0, -signal.SIGTERM)
        log.info("all workers stopped")
        return 1 if failed else 0


def run(argv: list[str], host: str, port: int, count: int, grace_s: float = 30.0) -> int:
    try:
        supervisor = Supervisor(argv, host, port, count, grace_s)
    except OSError as exc:
        print(f"deepinfer-router: {exc}", file=sys.stderr)
        return 1
    return supervisor.run()
