"""Why a request went where it went: the values of `x-deepinfer-route` and of the
`reason` label of `deepinfer_routing_decisions_total`. A fixed, small set (bounded label
cardinality); routing/README.md explains each."""

from __future__ import annotations

from typing import Final

PREFIX: Final = "prefix"  # the chosen engine holds (an estimated) part of the prompt prefix
SESSION: Final = "session"  # the session's binding was kept
SPILL: Final = "spill"  # the affinity target (prefix or session) was over its load bound
BALANCE: Final = "balance"  # a prefix match existed but a less loaded engine scored better
NEW_PREFIX: Final = "new-prefix"  # first placement of a prompt nobody holds
LEAST_CONN: Final = "least-conn"  # nothing to be affine to: least loaded engine
SESSION_NEW: Final = "session-new"  # session policy: first placement of a session
ROUND_ROBIN: Final = "round-robin"

ALL: Final = (PREFIX, SESSION, SPILL, BALANCE, NEW_PREFIX, LEAST_CONN, SESSION_NEW, ROUND_ROBIN)
