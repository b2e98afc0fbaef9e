"""Host-local state: one JSON file per running launch, which is also the GPU (and port)
reservation, under a directory shared by every `deepinfer-engine` on the host.

Every read-modify-write happens under an exclusive `flock` on `<dir>/lock`, so two
launches started at once never pick the same GPU. An entry whose supervisor pid is dead
(or was reused by another process) is stale and removed on the next read.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

STATE_DIR_ENV = "DEEPINFER_ENGINE_STATE_DIR"


def _usable(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


def default_state_dir() -> Path:
    """/run/deepinfer (shared by all users of the host, gone on reboot like the engines),
    else $XDG_RUNTIME_DIR/deepinfer, else ~/.local/state/deepinfer."""
    candidates = [Path("/run/deepinfer")]
    if os.environ.get("XDG_RUNTIME_DIR"):
        candidates.append(Path(os.environ["XDG_RUNTIME_DIR"]) / "deepinfer")
    candidates.append(Path.home() / ".local" / "state" / "deepinfer")
    for path in candidates:
        if _usable(path):
            return path
    return candidates[-1]


def resolve_state_dir(value: str | None) -> Path:
    value = value or os.environ.get(STATE_DIR_ENV)
    return Path(value) if value else default_state_dir()


def process_start_time(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (Linux), to tell a pid reused by
    another process from ours. None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parens: split after the last ')'.
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[19])  # field 22 overall


def pid_alive(pid: int, start_time: int | None = None) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "Z":  # a zombie has finished
            return False
    except OSError:
        pass
    if start_time is not None:
        now = process_start_time(pid)
        if now is not None and now != start_time:
            return False
    return True


def group_alive(pgid: int) -> bool:
    """Whether any process of the group still runs (zombies do not count)."""
    if pgid <= 0:
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # killpg(0) also succeeds for zombies: look for a live member in /proc.
    try:
        entries = os.listdir("/proc")
    except OSError:
        return True
    for name in entries:
        if not name.isdigit():
            continue
        try:
            fields = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def leader_reused(entry: LaunchEntry) -> bool:
    """Whether the group's leader pid now belongs to another process (after a reboot with
    a persistent state directory): then that group is not ours to keep or stop."""
    if entry.pgid_start is None:
        return False
    now = process_start_time(entry.pgid)
    return now is not None and now != entry.pgid_start


class LaunchEntry(BaseModel):
    """One running `deepinfer-engine launch`, as `list` and `stop` see it."""

    id: str
    model: str
    url: str
    port: int
    pid: int  # the supervisor (the process `stop` signals)
    pid_start: int | None = None
    pgid: int = 0  # vLLM's process group, 0 while none runs
    pgid_start: int | None = None  # its leader's start time (a reused pid is not it)
    # Set by the agent: which replica this engine is, and which agent started it.
    deployment: str | None = None
    deployment_uid: str | None = None  # which creation of it (ids repeat)
    replica: int | None = None
    agent: str | None = None
    gpus: list[str] = Field(default_factory=list)  # UUIDs (the reservation)
    gpu_indices: list[int] = Field(default_factory=list)
    state: str = "starting"  # starting | ready | restarting | stopping | failed
    restarts: int = 0
    started_at: float = 0.0
    log_file: str = ""
    registry: str | None = None
    stop_timeout_s: float = 30.0
    command: list[str] = Field(default_factory=list)
    kv_ports: list[int] = Field(default_factory=list)  # the KV event feed's (kv_relay.py)


class StateDir:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.engines = path / "engines"
        self.logs = path / "logs"

    def ensure(self) -> None:
        self.engines.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.ensure()
        with open(self.path / "lock", "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _file(self, engine_id: str) -> Path:
        return self.engines / f"{engine_id}.json"

    def _read_all(self) -> list[LaunchEntry]:
        """All entries, stale ones removed. Call under the lock."""
        out: list[LaunchEntry] = []
        if not self.engines.is_dir():
            return out
        for f in sorted(self.engines.glob("*.json")):
            try:
                entry = LaunchEntry.model_validate_json(f.read_text())
            except (OSError, ValueError):
                f.unlink(missing_ok=True)  # a torn or foreign file is no reservation
                continue
            if not pid_alive(entry.pid, entry.pid_start):
                if entry.pgid and group_alive(entry.pgid) and not leader_reused(entry):
                    entry.state = "orphaned"  # supervisor died, vLLM still runs: keep it
                    out.append(entry)
                    continue
                f.unlink(missing_ok=True)
                continue
            out.append(entry)
        return out

    def entries(self) -> list[LaunchEntry]:
        with self.locked():
            return self._read_all()

    def _write(self, entry: LaunchEntry) -> None:
        data = entry.model_dump_json(indent=1)
        fd, tmp = tempfile.mkstemp(dir=self.engines, prefix=".tmp-")
        with os.fdopen(fd, "w") as fh:
            fh.write(data)
        os.replace(tmp, self._file(entry.id))  # atomic: readers never see half a file

    def write(self, entry: LaunchEntry) -> None:
        with self.locked():
            self._write(entry)

    def update(self, engine_id: str, **changes: Any) -> None:
        with self.locked():
            f = self._file(engine_id)
            try:
                entry = LaunchEntry.model_validate_json(f.read_text())
            except (OSError, ValueError):
                return
            self._write(entry.model_copy(update=changes))

    def remove(self, engine_id: str, pid: int | None = None) -> None:
        """Remove an entry (only if still owned by `pid`, when given)."""
        with self.locked():
            f = self._file(engine_id)
            if pid is not None:
                try:
                    if LaunchEntry.model_validate_json(f.read_text()).pid != pid:
                        return
                except (OSError, ValueError):
                    return
            f.unlink(missing_ok=True)

    def claim(self, entry_factory: Any) -> LaunchEntry:
        """Under the lock: call `entry_factory(live_entries)` (which selects GPUs and checks
        the port, raising to refuse) and record the returned entry."""
        with self.locked():
            entries = self._read_all()
            entry: LaunchEntry = entry_factory(entries)
            self._write(entry)
            return entry
