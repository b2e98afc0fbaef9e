"""`deepinfer-engine gpus`: table, --json, and the no-driver message (exit code 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deepinfer_engine.cli import main
from tests.fakes.fake_nvml import write_state

pytestmark = pytest.mark.timeout(20)


def test_table_and_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                        capsys: pytest.CaptureFixture[str]) -> None:
    state = write_state(tmp_path / "s.json", [
        {"used_gib": 10, "utilization": 12, "processes": [{"pid": 7, "name": "python"}]}, {}])
    monkeypatch.setenv("DEEPINFER_ENGINE_FAKE_NVML", str(state))
    assert main(["gpus"]) == 0
    out = capsys.readouterr().out
    assert "IDX" in out and "7:python" in out and "12%" in out
    assert main(["gpus", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["driver_version"] == "550.54.15"
    assert [g["index"] for g in data["gpus"]] == [0, 1]
    assert data["gpus"][0]["memory_used"] == 10 * 1024**3


def test_no_driver_subprocess(tmp_path: Path) -> None:
    state = write_state(tmp_path / "s.json", [], init_error="DRIVER_NOT_LOADED")
    env = {**os.environ, "DEEPINFER_ENGINE_FAKE_NVML": str(state)}
    proc = subprocess.run([sys.executable, "-m", "deepinfer_engine.cli", "gpus"], env=env,
                          capture_output=True, text=True, timeout=15)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no NVIDIA driver" in lines[0] and "Driver Not Loaded" in lines[0]
