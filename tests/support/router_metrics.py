"""Reading an in-process router's Prometheus registry in tests."""

from __future__ import annotations

from typing import Any

from deepinfer_router.state import STATE


def samples(r: Any, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample called `name` (a RunningServer's router)."""
    return [
        (dict(sample.labels), sample.value)
        for family in r.app[STATE].metrics.registry.collect()
        for sample in family.samples
        if sample.name == name
    ]


def metric(r: Any, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    return sum(
        value for have, value in samples(r, name)
        if all(have.get(k) == v for k, v in labels.items())
    )
