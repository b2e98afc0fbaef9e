"""Who is served next when the fleet is saturated (pure: time is an argument).

Waiting requests are ordered in two steps:

1. class: `interactive` before `standard` before `batch` (names and order configurable),
   with aging: a class whose oldest request has waited `aging_s` counts as one class
   higher, two classes higher after twice that, and so on (a tie goes to the higher
   class). So a batch request under a steady interactive load waits at most
   (its rank - the top rank + 1) x `aging_s` before its class is served, plus the
   service time of what is ahead of it in its own class: nothing is starved.
2. tenant, within the class: weighted fair queueing on a virtual clock per class
   (start-time fair queueing). A request's virtual finish is its start (the later of the
   class clock and its tenant's last finish) plus its cost / the tenant's weight; the
   request with the smallest finish goes first, and the class clock moves to its start.
   Over a backlog each tenant gets work in proportion to its weight. The cost is what
   the request will cost the fleet (uncached prompt tokens plus weighted output tokens,
   estimated at admission); `correct` moves the tenant's clock by the difference once
   the real cost is known, so an estimate that was off is paid for by that tenant's
   next requests, not by the others.

One FIFO per (class, tenant) and a heap of tenant heads per class: push and pop are
O(log tenants); a request that leaves the queue early (timeout, client gone) is
dropped lazily.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

DEFAULT_CLASSES = ("interactive", "standard", "batch")


@dataclass(slots=True)
class Waiting:
    """One queued request (`key`: the caller's handle for it)."""

    key: object
    tenant: str
    klass: str
    cost: float
    arrived: float
    start: float = 0.0  # virtual start and finish in its class
    finish: float = 0.0
    gone: bool = False  # left the queue (timed out, cancelled): skipped when reached
    served: bool = False


@dataclass(slots=True)
class _Class:
    rank: int
    clock: float = 0.0  # virtual time
    last_finish: dict[str, float] = field(default_factory=dict)  # per tenant
    fifos: dict[str, deque[Waiting]] = field(default_factory=dict)  # per tenant
    heads: list[tuple[float, int, str]] = field(default_factory=list)  # (finish, seq, tenant)
    arrivals: deque[Waiting] = field(default_factory=deque)  # oldest first (for aging)
    size: int = 0


class FairQueue:
    def __init__(
        self,
        classes: Sequence[str] = DEFAULT_CLASSES,
        weights: Mapping[str, float] | None = None,
        *,
        aging_s: float = 10.0,
        default_weight: float = 1.0,
    ) -> None:
        if not classes or len(set(classes)) != len(classes):
            raise ValueError("classes must be distinct and at least one")
        if aging_s <= 0 or default_weight <= 0:
            raise ValueError("aging_s and default_weight must be positive")
        self._classes = {name: _Class(rank) for rank, name in enumerate(classes)}
        self._weights = dict(weights or {})
        if any(w <= 0 for w in self._weights.values()):
            raise ValueError("weights must be positive")
        self._default_weight = default_weight
        self._aging_s = aging_s
        self._seq = itertools.count()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def weight(self, tenant: str) -> float:
        return self._weights.get(tenant, self._default_weight)

    def push(self, key: object, tenant: str, klass: str, cost: float, now: float) -> Waiting:
        c = self._classes[klass]
        item = Waiting(key, tenant, klass, max(cost, 0.0), now)
        item.start = max(c.clock, c.last_finish.get(tenant, 0.0))
        item.finish = item.start + item.cost / self.weight(tenant)
        c.last_finish[tenant] = item.finish
        fifo = c.fifos.get(tenant)
        if fifo is None:
            fifo = c.fifos[tenant] = deque()
        fifo.append(item)
        if len(fifo) == 1:
            heapq.heappush(c.heads, (item.finish, next(self._seq), tenant))
        c.arrivals.append(item)
        c.size += 1
        self._size += 1
        return item

    def remove(self, item: Waiting) -> None:
        """`item` leaves without being served (its tenant is not charged for it)."""
        if item.gone:
            return
        item.gone = True
        c = self._classes[item.klass]
        c.size -= 1
        self._size -= 1
        # Its virtual time is given back when it is the tenant's last request.
        if c.last_finish.get(item.tenant) == item.finish:
            c.last_finish[item.tenant] = item.start

    def pop(self, now: float) -> Waiting | None:
        """The next request to serve, or None when nothing waits."""
        best: _Class | None = None
        best_rank = 0.0
        for c in self._classes.values():
            oldest = self._oldest(c)
            if oldest is None:
                continue
            rank = c.rank - int((now - oldest.arrived) / self._aging_s)
            if best is None or rank < best_rank or (rank == best_rank and c.rank < best.rank):
                best, best_rank = c, rank
        if best is None:
            return None
        item = self._pop_class(best)
        best.size -= 1
        self._size -= 1
        best.clock = max(best.clock, item.start)
        return item

    def correct(self, tenant: str, klass: str, estimated: float, actual: float) -> None:
        """The request cost `actual`, not the `estimated` it was charged: the tenant's
        clock in the class moves by the difference (its later requests pay for it)."""
        c = self._classes[klass]
        if tenant in c.last_finish:
            c.last_finish[tenant] = max(
                c.clock, c.last_finish[tenant] + (actual - estimated) / self.weight(tenant))

    def waiting(self) -> dict[tuple[str, str], int]:
        """Requests waiting per (class, tenant)."""
        return {(name, tenant): sum(1 for w in fifo if not w.gone)
                for name, c in self._classes.items() for tenant, fifo in c.fifos.items()
                if fifo}

    # --- internals -------------------------------------------------------------------
    @staticmethod
    def _oldest(c: _Class) -> Waiting | None:
        arrivals = c.arrivals
        while arrivals and (arrivals[0].gone or arrivals[0].served):
            arrivals.popleft()
        return arrivals[0] if arrivals else None

    def _pop_class(self, c: _Class) -> Waiting:
        # Called only when the class holds a live request, so this ends.
        while True:
            _, _, tenant = heapq.heappop(c.heads)
            fifo = c.fifos[tenant]
            item = fifo.popleft()
            while fifo and fifo[0].gone:
                fifo.popleft()
            if fifo:  # the tenant's next request is its head now
                heapq.heappush(c.heads, (fifo[0].finish, next(self._seq), tenant))
            else:
                del c.fifos[tenant]
            if not item.gone:
                item.served = True
                return item
