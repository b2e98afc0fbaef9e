"""Build the configured policy from the router settings."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import RoutingPolicy
from .kv_aware import KvAwareParams, KvAwarePolicy
from .least_conn import LeastConnPolicy
from .round_robin import RoundRobinPolicy
from .session import SessionPolicy

if TYPE_CHECKING:
    from ..settings import RouterSettings

POLICIES = ("kv-aware", "session", "least-conn", "round-robin")


def kv_aware_params(settings: RouterSettings, *, hint_outbox: int = 0) -> KvAwareParams:
    return KvAwareParams(
        chunk_chars=settings.prefix_chunk_chars,
        balance_factor=settings.balance_factor,
        balance_slack=settings.balance_slack,
        load_cost_chars=settings.load_cost_chars,
        running_weight=settings.running_load_weight,
        kv_usage_weight=settings.kv_usage_load_weight,
        placement_window=settings.placement_window,
        prefill_load_chars=settings.prefill_load_chars,
        session_ttl_s=settings.session_ttl_s,
        max_sessions=settings.max_sessions,
        default_capacity_chars=int(settings.default_engine_kv_tokens * settings.chars_per_token),
        hint_outbox=hint_outbox,
    )


def make_policy(settings: RouterSettings, *, hint_outbox: int = 0) -> RoutingPolicy:
    """The policy named by `settings.policy`. `hint_outbox` > 0 keeps that many recent
    kv-aware placements for `export_hints` (multi-router sharing)."""
    name = settings.policy
    if name == "kv-aware":
        return KvAwarePolicy(kv_aware_params(settings, hint_outbox=hint_outbox))
    if name == "session":
        return SessionPolicy(
            session_ttl_s=settings.session_ttl_s,
            max_sessions=settings.max_sessions,
            balance_factor=settings.balance_factor,
            balance_slack=settings.balance_slack,
        )
    if name == "least-conn":
        return LeastConnPolicy()
    if name == "round-robin":
        return RoundRobinPolicy()
    raise ValueError(f"unknown policy {name!r}; expected one of {', '.join(POLICIES)}")
