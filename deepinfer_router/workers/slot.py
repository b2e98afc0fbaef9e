"""What a worker process knows about its place among the router's workers."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# Set by the supervisor for each worker it starts ("INDEX,COUNT,FD,DIR"); internal, so
# not under the DEEPINFER_ prefix the settings read.
SLOT_ENV = "_DEEPINFER_WORKER_SLOT"


MAX_AUTO_WORKERS = 16  # every pair of workers talks: beyond this, more routers instead


def usable_cores(cgroup_cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """Cores this process may use: its CPU affinity, and a cgroup v2 CPU quota below it
    (how Kubernetes limits a container: the affinity still lists every core)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = cgroup_cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def auto_workers() -> int:
    return min(usable_cores(), MAX_AUTO_WORKERS)


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
    epoch: str  # this launch of the router (random): names static engines' instances
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
        return f"{self.index},{self.count},{self.fd},{self.epoch},{self.directory}"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> WorkerSlot | None:
        value = (os.environ if environ is None else environ).get(SLOT_ENV)
        if not value:
            return None
        index, count, fd, epoch, directory = value.split(",", 4)
        return cls(int(index), int(count), int(fd), epoch, Path(directory))
