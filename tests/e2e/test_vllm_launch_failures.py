"""The engine manager against real vLLM (CPU build) failing to start: a model that is not
there and a bad vLLM flag are reported as permanent failures after one start, never
retried in a loop. The texts behind tests/fakes/vllm_cpu_output/ are what this build
prints; this checks that it still prints them so."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.e2e.vllm_cmd import cpu_env, serve_flags
from tests.support.procs import console_script, free_port

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(300)]


def launch(tmp_path: Path, model: str, *vllm_flags: str) -> tuple[int, str, str]:
    """`deepinfer-engine launch MODEL --gpus none`: (exit code, its output, vLLM's log)."""
    log = tmp_path / "vllm.log"
    argv = [console_script("deepinfer-engine"), "launch", model, "--gpus", "none",
            "--host", "127.0.0.1", "--port", str(free_port()),
            "--state-dir", str(tmp_path / "state"), "--log-file", str(log),
            "--ready-timeout-s", "240", "--restart-backoff-s", "1",
            "--", *serve_flags(), *vllm_flags]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=280, env=cpu_env(),
                          stdin=subprocess.DEVNULL)
    return proc.returncode, proc.stdout + proc.stderr, log.read_text() if log.exists() else ""


@pytest.mark.parametrize(("model", "flags", "kind"), [
    ("/nonexistent/tiny-model", (), "model not found"),
    ("no-such-org/no-such-model", (), "model not found"),  # offline: not in the cache
    ("/nonexistent/tiny-model", ("--bogus-flag", "1"), "bad argument"),
], ids=["missing-path", "hub-id-not-cached", "unknown-flag"])
def test_real_vllm_start_failures_are_permanent(tmp_path: Path, model: str,
                                                flags: tuple[str, ...], kind: str) -> None:
    rc, out, log = launch(tmp_path, model, *flags)
    assert rc == 1, out[-2000:]
    assert f"permanent failure ({kind})" in out, out[-2000:]
    assert log.count("=== deepinfer-engine") == 1, "started more than once"
    assert "restarting the engine" not in out
