"""Memory soak, CI size: 20,000 requests through a real router process (benchmarks/soak.py;
the full benchmark runs 200,000). After warm-up the router's resident memory stays flat:
session bindings, prefix estimates, per-request records and metric label sets are all
bounded, and the run reaches each bound early."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(150)


def test_soak_20k_requests_rss_flat_after_warmup(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--requests", "20000",
         "--out", str(out), "--router-log", str(tmp_path / "router.log")],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(out.read_text())
    assert report["unexpected"] == []
    statuses = report["statuses"]
    assert sum(statuses.values()) == 20_000
    assert not any(key.endswith(("500", "502", "503", "504")) for key in statuses)
    assert report["growth_after_warmup_pct"] < 15, report["rss"]
    assert report["peak_growth_after_warmup_pct"] < 15, report["rss"]
    log = (tmp_path / "router.log").read_text()
    assert "Traceback" not in log
