"""The policy interface: pure decision code, no I/O, time passed in.

A policy gets the request's features and the candidate engines (already filtered to
healthy, non-draining engines serving the model) and returns a Decision. The router calls
`on_routed` once the request is actually sent, `on_first_token` when a streamed answer's
first chunk arrives (the engine has finished the prompt's prefill; not called for answers
that arrive whole), `on_complete` when it ends, and `forget_engine` when an engine leaves
or restarts (new instance).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..settings import RouterSettings

# What the fleet knows of an engine named by another router's hint: (instance, KV
# capacity in prompt characters), or None for an engine that is not in the fleet.
EngineLookup = Callable[[str], "tuple[str, int] | None"]


@dataclass(slots=True)
class RequestFeatures:
    """What routing knows about a request."""

    model: str
    session_key: str | None = None
    # Chained xxhash of fixed-size prompt character chunks: hashes[i] covers chars
    # [0, (i+1)*chunk). Empty when no policy asked for the prompt text.
    chunk_hashes: list[int] = field(default_factory=list)
    prompt_chars: int = 0
    # The prompt as token ids, where the request gives them (a completions `prompt` of
    # ints) or the router tokenized it: what the precise index (vLLM's KV events) can be
    # asked about. An array('i') (4 bytes an id; Python ints cost 32+).
    prompt_token_ids: Sequence[int] | None = None
    # False where prompt_token_ids are only the prompt's start: the router tokenized no
    # further because no engine holds all of that start (see proxy/dispatch.py).
    token_ids_complete: bool = True
    prompt_tokens: int = 0  # the prompt's length in tokens, estimated when incomplete


@dataclass(slots=True)
class Candidate:
    """One engine that may take the request, with what the router knows of its load."""

    id: str
    instance: str
    inflight: int = 0  # requests this router has in flight to it (exact)
    waiting: float = 0.0  # scraped vllm:num_requests_waiting (0 when stale)
    running: float = 0.0  # scraped vllm:num_requests_running (0 when stale)
    kv_usage: float = 0.0  # scraped vllm:kv_cache_usage_perc in [0, 1]
    kv_capacity_chars: int = 0  # KV capacity of the engine in prompt characters
    # What the engine really holds of this prompt, in prompt characters, from its KV
    # events (kv_events/); None where unknown (no live feed, no token ids): then the
    # policy's own estimate stands.
    precise_cached_chars: int | None = None
    precise_cached_tokens: int | None = None  # the same, as raw tokens (every tier)
    block_size: int = 0  # the engine's KV block size in tokens, where known (0: unknown)
    # In a fleet where some engines are precise: what this engine's estimate is multiplied
    # by to compare with their figures (estimate_correction.py; 1.0: as estimated).
    estimate_factor: float = 1.0

    @property
    def load(self) -> float:
        """Load for balancing: in flight here plus queued at the engine."""
        return self.inflight + self.waiting


# What a policy weighed for one candidate: load cost (request units), cache pressure
# (prefill chars) and score, each None where that step did not compute it.
Weighed = tuple[float, "float | None", "float | None"]


@dataclass(slots=True)
class Decision:
    engine_id: str
    reason: str  # goes to x-deepinfer-route and deepinfer_routing_decisions_total{reason}
    matched_chars: int = 0
    # For the decision's explanation (explain.py), where the policy keeps them (kv-aware
    # while it is `explaining`): cached prefix chunks per engine as counted, what was
    # weighed per candidate, the guard's bound and the session's engine. Not frozen: it
    # is built on every request, and a frozen dataclass costs more to build.
    held: Mapping[str, int] | None = None
    chunk_chars: int = 0  # the unit of `held`
    weighed: Mapping[str, Weighed] | None = None
    load_bound: float | None = None
    session_engine: str | None = None


class RoutingPolicy(Protocol):
    name: str
    needs_prompt: bool  # False: the router skips prompt extraction and hashing
    # True while the router keeps a decision log: decisions carry what the policy weighed
    # (Decision.held, .weighed, ...) for their explanation, where the policy keeps it.
    explaining: bool

    def select(
        self, request: RequestFeatures, candidates: Sequence[Candidate], now: float
    ) -> Decision: ...

    def on_routed(self, request: RequestFeatures, decision: Decision, now: float) -> None: ...

    def on_first_token(self, request: RequestFeatures, engine_id: str, now: float) -> None: ...

    def on_complete(
        self, request: RequestFeatures, engine_id: str, ok: bool, now: float
    ) -> None: ...

    def forget_engine(self, engine_id: str) -> None: ...

    def prompt_features(
        self, body: Mapping[str, Any], model: str, session_key: str | None
    ) -> RequestFeatures: ...

    def state_sizes(self) -> dict[str, int]: ...

    def expected_cached_chars(self, request: RequestFeatures) -> int: ...

    def export_hints(self, limit: int = 0) -> list[dict[str, Any]]: ...

    def import_hints(
        self, hints: Iterable[Mapping[str, Any]], now: float, lookup: EngineLookup
    ) -> int: ...


class PolicyBase:
    """No-op hooks, so a simple policy only writes `select` (and `from_settings` when it
    takes settings)."""

    name = "base"
    needs_prompt = False
    explaining = False

    @classmethod
    def from_settings(cls, settings: RouterSettings, *, hint_outbox: int = 0) -> Any:
        """The policy as the router's settings configure it (factory.POLICY_CLASSES)."""
        return cls()

    def prompt_features(
        self, body: Mapping[str, Any], model: str, session_key: str | None
    ) -> RequestFeatures:
        """What this policy needs to know of a request (called only when `needs_prompt`):
        the policy decides how its features are computed (chunk size, prompt cap)."""
        return RequestFeatures(model=model, session_key=session_key)

    def on_routed(self, request: RequestFeatures, decision: Decision, now: float) -> None:
        return None

    def on_first_token(self, request: RequestFeatures, engine_id: str, now: float) -> None:
        return None

    def on_complete(self, request: RequestFeatures, engine_id: str, ok: bool, now: float) -> None:
        return None

    def forget_engine(self, engine_id: str) -> None:
        return None

    def state_sizes(self) -> dict[str, int]:
        """Entries in each bounded table the policy keeps (for
        deepinfer_routing_state_entries): none for a stateless policy."""
        return {}

    def expected_cached_chars(self, request: RequestFeatures) -> int:
        """The most prompt chars any engine is expected to hold already (what a request
        is not charged for when it waits: fairness/queue.py). Unknown: 0."""
        return 0

    # Multi-router sharing (kv-aware overrides them): placements made here, as plain
    # JSON-able dicts, for other routers to import. No-ops for policies without state.
    def export_hints(self, limit: int = 0) -> list[dict[str, Any]]:
        return []

    def import_hints(
        self, hints: Iterable[Mapping[str, Any]], now: float, lookup: EngineLookup
    ) -> int:
        return 0
