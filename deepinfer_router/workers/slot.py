"""What a worker process knows about its place among the router's workers."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# Set by the supervisor for each worker it starts ("INDEX,COUNT,FD,DIR"); internal, so
# not under the DEEPINFER_ prefix the settings read.
SLOT_ENV = "_DEEPINFER_WORKER_SLOT"


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, as a container limits it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def split(total: int, index: int, count: int, minimum: int = 0) -> int:
    """Worker `index`'s share of a router-wide limit: the shares differ by at most one
    and add up to exactly `total` (at least `minimum` each, which only a total smaller
    than the worker count exceeds)."""
    return max(minimum, total // count + (1 if index < total % count else 0))


@dataclass(frozen=True, slots=True)
class WorkerSlot:
    index: int
    count: int
    fd: int  # the listening socket, inherited from the supervisor
    directory: Path  # private (0700): the workers' Unix sockets

    def socket_path(self, index: int) -> Path:
        return self.directory / f"worker-{index}.sock"

    @property
    def own_socket(self) -> Path:
        return self.socket_path(self.index)

    @property
    def sibling_sockets(self) -> list[Path]:
        return [self.socket_path(i) for i in range(self.count) if i != self.index]

    def encode(self) -> str:
        return f"{self.index},{self.count},{self.fd},{self.directory}"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> WorkerSlot | None:
        value = (os.environ if environ is None else environ).get(SLOT_ENV)
        if not value:
            return None
        index, count, fd, directory = value.split(",", 3)
        return cls(int(index), int(count), int(fd), Path(directory))
