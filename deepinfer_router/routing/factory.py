"""Policies by name: one class per file, found here (the registry), built from the
router's settings by the class itself (`from_settings`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import RoutingPolicy
from .kv_aware import KvAwarePolicy
from .least_conn import LeastConnPolicy
from .round_robin import RoundRobinPolicy
from .session import SessionPolicy

if TYPE_CHECKING:
    from ..settings import RouterSettings

# name -> class; settings.PolicyName lists the same names (a unit test holds them equal).
POLICY_CLASSES = {
    cls.name: cls for cls in (KvAwarePolicy, SessionPolicy, LeastConnPolicy, RoundRobinPolicy)
}
POLICIES = tuple(POLICY_CLASSES)


def make_policy(settings: RouterSettings, *, hint_outbox: int = 0) -> RoutingPolicy:
    """The policy named by `settings.policy`. `hint_outbox` > 0 keeps that many recent
    kv-aware placements for `export_hints` (multi-router sharing)."""
    cls = POLICY_CLASSES.get(settings.policy)
    if cls is None:
        raise ValueError(
            f"unknown policy {settings.policy!r}; expected one of {', '.join(POLICIES)}"
        )
    policy: RoutingPolicy = cls.from_settings(settings, hint_outbox=hint_outbox)
    return policy
