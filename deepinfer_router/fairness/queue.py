"""Who is served next when the fleet is saturated (pure: time is an argument).

Waiting requests are ordered in two steps:

1. class: `interactive` before `standard` before `batch` (names and order configurable),
   with aging: a class whose oldest request has waited `aging_s` counts as one class
   higher, two classes higher after twice that, and so on; between classes that count
   as equal, the one whose oldest request has waited longer goes first. So a batch
   request under a steady interactive load waits at most about
   (its rank - the top rank) x `aging_s` before its class is served, plus the service
   time of what is ahead of it in its own class: nothing is starved.
2. tenant, within the class: start-time fair queueing on a virtual clock per class. A
   tenant's first waiting request gets its tags when it reaches the head of its
   tenant's line: start = the later of the class clock and the finish of the tenant's
   last *served* request, finish = start + cost / the tenant's weight. The head with the
   smallest start goes first and the class clock moves to it. Over a backlog each tenant
   gets work in proportion to its weight; a request that leaves unserved (timeout,
   client gone) costs its tenant nothing. The cost is what the request will cost the
   fleet (estimated uncached prompt tokens); `correct` moves the tenant's finish by the
   difference once the real cost is known, so its next requests pay for an estimate
   that was off.

`order` can also be "round-robin" (tenants in turn: one class, every request costs 1,
equal weights) or "fifo" (one line), the orders the fair one is measured against
(benchmarks/fairness.py).

One FIFO per (class, tenant) and a heap of tenant heads per class: push and pop are
O(log tenants). A request that leaves early is dropped lazily, its handle released at
once; a class that empties starts a new busy period (clock and per-tenant state reset),
so nothing of an idle class's past is kept.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

DEFAULT_CLASSES = ("interactive", "standard", "batch")
QueueOrder = Literal["fair", "round-robin", "fifo"]


@dataclass(slots=True)
class Waiting:
    """One queued request (`key`: the caller's handle for it, dropped once it leaves)."""

    key: object
    tenant: str
    klass: str
    cost: float
    arrived: float
    start: float = 0.0  # virtual tags, given when it reaches its tenant's head
    finish: float = 0.0
    gone: bool = False  # left the queue (timed out, cancelled): skipped when reached
    served: bool = False


@dataclass(slots=True)
class _Class:
    rank: int
    clock: float = 0.0  # virtual time
    served_finish: dict[str, float] = field(default_factory=dict)  # per tenant
    fifos: dict[str, deque[Waiting]] = field(default_factory=dict)  # per tenant
    heads: list[tuple[float, int, str]] = field(default_factory=list)  # (start, seq, tenant)
    arrivals: deque[Waiting] = field(default_factory=deque)  # oldest first (for aging)
    size: int = 0  # live requests
    dead: int = 0  # left early, not yet dropped

    def reset(self) -> None:
        """Empty: a new busy period (nothing of the past carries over)."""
        self.clock = 0.0
        self.served_finish.clear()
        self.fifos.clear()
        self.heads.clear()
        self.arrivals.clear()
        self.dead = 0


class FairQueue:
    def __init__(
        self,
        classes: Sequence[str] = DEFAULT_CLASSES,
        weights: Mapping[str, float] | None = None,
        *,
        aging_s: float = 10.0,
        default_weight: float = 1.0,
        order: QueueOrder = "fair",
    ) -> None:
        if not classes or len(set(classes)) != len(classes):
            raise ValueError("classes must be distinct and at least one")
        if aging_s <= 0 or default_weight <= 0:
            raise ValueError("aging_s and default_weight must be positive")
        self._classes = {name: _Class(rank) for rank, name in enumerate(classes)}
        self._order = order
        self._top = classes[0]
        self._weights = dict(weights or {}) if order == "fair" else {}
        if any(w <= 0 for w in self._weights.values()):
            raise ValueError("weights must be positive")
        self._default_weight = default_weight
        self._aging_s = aging_s
        self._seq = itertools.count()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    @property
    def class_count(self) -> int:
        return len(self._classes) if self._order == "fair" else 1

    def weight(self, tenant: str) -> float:
        return self._weights.get(tenant, self._default_weight)

    def push(self, key: object, tenant: str, klass: str, cost: float, now: float) -> Waiting:
        if self._order != "fair":
            klass, cost = self._top, 1.0
            if self._order == "fifo":
                tenant = ""
        c = self._classes[klass]
        item = Waiting(key, tenant, klass, max(cost, 0.0), now)
        fifo = c.fifos.get(tenant)
        if fifo is None:
            fifo = c.fifos[tenant] = deque()
        fifo.append(item)
        if len(fifo) == 1:
            self._head(c, tenant, item)
        c.arrivals.append(item)
        c.size += 1
        self._size += 1
        return item

    def remove(self, item: Waiting) -> None:
        """`item` leaves without being served (its tenant is not charged for it)."""
        if item.gone or item.served:
            return
        item.gone = True
        item.key = None  # the caller's handle (and what it holds) is not kept
        c = self._classes[item.klass]
        c.size -= 1
        c.dead += 1
        self._size -= 1
        if c.size == 0:
            c.reset()
        elif c.dead > 2 * c.size + 64:
            self._compact(c)

    def rank(self, klass: str) -> int:
        """`klass`'s place in the priority order (0: the highest)."""
        if self._order != "fair":
            return 0
        return self._classes[klass].rank

    def waiting_at_or_above(self, rank: int,
                            allowed: Callable[[int], bool] | None = None) -> bool:
        """Whether a request of a class of rank <= `rank` (and `allowed`) waits."""
        return any(c.size for c in self._classes.values()
                   if c.rank <= rank and (allowed is None or allowed(c.rank)))

    def pop(self, now: float, allowed: Callable[[int], bool] | None = None
            ) -> Waiting | None:
        """The next request to serve, or None when nothing waits (`allowed`: only from
        the classes whose rank it accepts, by their own rank, whatever their age)."""
        best: _Class | None = None
        best_key = (0, 0.0)
        for c in self._classes.values():
            if allowed is not None and c.size and not allowed(c.rank):
                continue
            oldest = self._oldest(c)
            if oldest is None:
                continue
            waited = now - oldest.arrived
            key = (c.rank - int(waited / self._aging_s), -waited)
            if best is None or key < best_key:
                best, best_key = c, key
        if best is None:
            return None
        item = self._pop_class(best)
        best.size -= 1
        self._size -= 1
        if best.size == 0:
            best.reset()
        return item

    def correct(self, tenant: str, klass: str, estimated: float, actual: float) -> None:
        """A served request cost `actual`, not the `estimated` it was charged: the
        tenant's finish in the class moves by the difference (its next requests pay)."""
        if self._order != "fair":
            return
        c = self._classes[klass]
        if tenant in c.served_finish:
            c.served_finish[tenant] = max(
                c.clock, c.served_finish[tenant] + (actual - estimated) / self.weight(tenant))

    def waiting(self) -> dict[tuple[str, str], int]:
        """Requests waiting per (class, tenant)."""
        out: dict[tuple[str, str], int] = {}
        for name, c in self._classes.items():
            for tenant, fifo in c.fifos.items():
                n = sum(1 for w in fifo if not w.gone)
                if n:
                    out[(name, tenant)] = n
        return out

    # --- internals -------------------------------------------------------------------
    def _head(self, c: _Class, tenant: str, item: Waiting) -> None:
        """`item` is its tenant's head now: its tags, and its place among the heads."""
        item.start = max(c.clock, c.served_finish.get(tenant, 0.0))
        item.finish = item.start + item.cost / self.weight(tenant)
        heapq.heappush(c.heads, (item.start, next(self._seq), tenant))

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
            if item.gone:
                c.dead -= 1
            else:
                item.served = True
                c.clock = max(c.clock, item.start)
                c.served_finish[tenant] = item.finish
            while fifo and fifo[0].gone:
                fifo.popleft()
                c.dead -= 1
            if fifo:  # the tenant's next request is its head now
                self._head(c, tenant, fifo[0])
            else:
                del c.fifos[tenant]
            if item.served:
                return item

    def _compact(self, c: _Class) -> None:
        """Many left early (a burst that timed out): drop them now, not when reached;
        every tenant keeps exactly one place among the heads."""
        heads: list[tuple[float, int, str]] = []
        for tenant in list(c.fifos):
            fifo = c.fifos[tenant]
            old_head = fifo[0] if fifo else None
            live = deque(w for w in fifo if not w.gone)
            if not live:
                del c.fifos[tenant]
                continue
            c.fifos[tenant] = live
            head = live[0]
            if head is not old_head:  # the head left: its successor takes its tags
                head.start = max(c.clock, c.served_finish.get(tenant, 0.0))
                head.finish = head.start + head.cost / self.weight(tenant)
            heads.append((head.start, next(self._seq), tenant))
        heapq.heapify(heads)
        c.heads = heads
        c.arrivals = deque(w for w in c.arrivals if not (w.gone or w.served))
        c.dead = 0
