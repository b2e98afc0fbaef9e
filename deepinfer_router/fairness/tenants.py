"""Who a request is for (its tenant) and at what priority (its class): pure parsing.

A tenant is the name of the API key a request used: `--api-key NAME:KEY` (a value
without `:` is a plain key of tenant `default`; a key that contains `:` is given with a
name). With API keys off, `--tenant-header` (trusted only when set) names it; otherwise
it is `default`. A request's class is its tenant's default class, which `X-Priority` may
lower and never raise.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field

from .queue import DEFAULT_CLASSES

DEFAULT_TENANT = "default"
OTHER_TENANT = "other"  # the metric label of every tenant not configured by name
DEFAULT_CLASS = "standard"
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_CLASS = re.compile(r"[a-z0-9_-]{1,32}")


@dataclass(frozen=True, slots=True)
class TenantKey:
    tenant: str
    key: str


@dataclass(frozen=True, slots=True)
class TenantLimits:
    """A tenant's budgets (None: no limit)."""

    max_concurrency: int | None = None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None

    def __bool__(self) -> bool:
        return any(v is not None for v in (self.max_concurrency, self.requests_per_minute,
                                           self.tokens_per_minute))


@dataclass(frozen=True, slots=True)
class Tenant:
    """A configured tenant: its share weight, default class and budgets."""

    name: str
    weight: float = 1.0
    klass: str | None = None  # None: the router's default class
    limits: TenantLimits = field(default_factory=TenantLimits)


class TenantTable:
    """Every configured tenant (the TOML `[tenants.NAME]` tables and the names
    `--api-key NAME:KEY` gives), the classes in priority order and the default class.
    A tenant not configured (named by --tenant-header) has weight 1, the default class and
    no budgets."""

    def __init__(self, tenants: Iterable[Tenant] = (), keys: Sequence[TenantKey] = (),
                 classes: Sequence[str] = DEFAULT_CLASSES,
                 default_class: str = DEFAULT_CLASS) -> None:
        self.classes = tuple(classes)
        if default_class not in self.classes:
            raise ValueError(f"the default class {default_class!r} is not one of "
                             f"{', '.join(self.classes)}")
        self.default_class = default_class
        self.keys = list(keys)
        self._tenants = {t.name: t for t in tenants}
        for t in self._tenants.values():
            if t.klass is not None and t.klass not in self.classes:
                raise ValueError(f"tenant {t.name}: class {t.klass!r} is not one of "
                                 f"{', '.join(self.classes)}")
        self.names = frozenset(self._tenants) | {k.tenant for k in self.keys}

    def klass(self, tenant: str) -> str:
        t = self._tenants.get(tenant)
        return t.klass if t is not None and t.klass is not None else self.default_class

    def weights(self) -> dict[str, float]:
        return {name: t.weight for name, t in self._tenants.items() if t.weight != 1.0}

    def limits(self) -> dict[str, TenantLimits]:
        return {name: t.limits for name, t in self._tenants.items() if t.limits}


def valid_tenant_name(name: str) -> bool:
    return _NAME.fullmatch(name) is not None


def valid_class_name(name: str) -> bool:
    return _CLASS.fullmatch(name) is not None


def check_tenant_name(name: str) -> None:
    """ValueError unless `name` may name a tenant."""
    if not valid_tenant_name(name):
        raise ValueError(f"tenant name {name[:70]!r}: 1-64 of A-Z a-z 0-9 _ . - expected")
    if name == OTHER_TENANT:
        raise ValueError(f"tenant name {OTHER_TENANT!r} is reserved (it labels every tenant "
                         "not configured by name)")


def parse_api_key(spec: str) -> TenantKey:
    """`NAME:KEY` or a plain `KEY` (tenant `default`); ValueError says what is wrong."""
    name, sep, key = spec.partition(":")
    if not sep:
        if not spec.strip():
            raise ValueError("an empty key is refused")
        return TenantKey(DEFAULT_TENANT, spec)
    if not valid_tenant_name(name):
        # (the value is not repeated: it may be a key that contains ':')
        raise ValueError("an --api-key NAME:KEY needs a NAME of 1-64 of A-Z a-z 0-9 _ . - "
                         "(a key that contains ':' is given as NAME:KEY)")
    if not key.strip():
        raise ValueError(f"tenant {name}: the key after ':' is empty")
    if name == OTHER_TENANT:
        raise ValueError(f"tenant name {OTHER_TENANT!r} is reserved (it labels every tenant "
                         "not configured by name)")
    return TenantKey(name, key)


def check_unique(keys: Sequence[TenantKey]) -> None:
    """One key, one tenant: a key given twice is refused (which would it name?)."""
    seen: set[str] = set()
    for k in keys:
        if k.key in seen:
            raise ValueError("the same key is given more than once")
        seen.add(k.key)


def header_tenant(value: str | None) -> str:
    """The tenant named by --tenant-header's value: a valid name, else `default`."""
    return value if value and valid_tenant_name(value) else DEFAULT_TENANT


def lower_class(default: str, x_priority: str | None,
                classes: Sequence[str] = DEFAULT_CLASSES) -> str:
    """The request's class: `default`, or the class `X-Priority` names when it is lower
    (later in `classes`); a higher or unknown one is ignored."""
    if not x_priority:
        return default
    wanted = x_priority.strip().lower()
    if wanted in classes and default in classes and classes.index(wanted) > classes.index(
            default):
        return wanted
    return default


def metric_tenant(tenant: str, configured: Collection[str]) -> str:
    """Metric labels stay bounded: configured names only, everything else `other`."""
    return tenant if tenant in configured or tenant == DEFAULT_TENANT else OTHER_TENANT
