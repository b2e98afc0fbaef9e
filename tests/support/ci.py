"""The one definition of "running in CI" for every skip rule in the suite.

`CI` set to any true value (1, true, yes, on; any case) means CI: `.ci/run` sets it, and
so do the usual CI services. Under CI no test may be skipped: a skip would hide a real
part (Redis, vLLM, openssl, ...) that CI must exercise, so tests/conftest.py turns every
skip into a failure there.
"""

from __future__ import annotations

import os

TRUE_VALUES = frozenset(("1", "true", "yes", "on"))


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in TRUE_VALUES
