"""Which budget gate a router part uses: Redis with --redis-url (every router sharing
it), the owner worker's with --workers, else this process's."""

from __future__ import annotations

from collections.abc import Mapping

from ..fairness.tenants import TenantLimits
from ..settings import RouterSettings
from ..workers.siblings import Siblings
from .gate import BudgetGate, LocalGate


def make_budget_gate(settings: RouterSettings, limits: Mapping[str, TenantLimits],
                     siblings: Siblings | None) -> BudgetGate:
    if settings.redis_url:
        from .redis_gate import RedisGate  # redis only when asked for

        return RedisGate(settings.redis_url, settings.registry_namespace, limits,
                         settings.request_timeout_s,
                         siblings.slot.count if siblings is not None else 1)
    # a place whose end was never told (its process died) is freed when the request
    # would have timed out anyway
    hold_s = settings.request_timeout_s + 5.0
    if siblings is not None:
        from .owner import OwnerGate

        return OwnerGate(limits, siblings, hold_s)
    return LocalGate(limits, hold_s)
