"""Memory soak, CI size: 20,000 requests through a real router process (benchmarks/soak.py;
the full benchmark runs 200,000). Each bound is checked directly, from the router's own
/metrics during and after the run: session bindings stay at most --max-sessions and reach
it, prefix estimates stay within the engines' KV capacity, per-request records and
in-flight counts return to zero, unknown model names add no label series. And after
warm-up the router's resident memory stays flat."""

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
    # Bounded tables, sampled every 1,000 requests.
    over_time = report["tables_over_time"]
    assert len(over_time) >= 10
    max_sessions = report["router_settings"]["max_sessions"]
    assert all(t["sessions"] <= max_sessions for t in over_time)
    assert over_time[-1]["sessions"] == max_sessions  # 50,000 distinct sessions: reached
    # 2 engines x 256 KV blocks x 16 tokens x 4 chars / 256-char chunks = 128 chunks
    chunk_bound = 2 * 256 * 16 * 4 // report["router_settings"]["prefix_chunk_chars"]
    assert all(0 < t["prefix_chunks"] <= chunk_bound for t in over_time)
    end = report["end_state"]
    assert end["engine_inflight"] == 0
    assert end["tables"]["requests"] == 0 and end["tables"]["hint_outbox"] == 0
    # ~200 unknown model names were asked for: none became a label.
    assert statuses.get("unknown:404", 0) > 100
    assert set(end["model_labels"]) <= {"soak-model", ""}, end["model_labels"]
    assert end["series"]["deepinfer_requests_total"] <= 30, end["series"]
    assert report["growth_after_warmup_pct"] < 15, report["rss"]
    assert report["peak_growth_after_warmup_pct"] < 15, report["rss"]
    log = (tmp_path / "router.log").read_text()
    assert "Traceback" not in log
