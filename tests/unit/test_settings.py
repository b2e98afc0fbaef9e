"""Settings: precedence, validation messages, and the example files kept in sync."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from deepinfer_router.cli import load
from deepinfer_router.settings import ENV_PREFIX, RouterSettings
from deepinfer_router.shared.settings_loader import (
    SettingsError,
    flag_name,
    load_settings,
    render_example_toml,
)

ROOT = Path(__file__).resolve().parents[2]


def test_precedence_flag_over_env_over_toml_over_default(tmp_path, monkeypatch):
    toml = tmp_path / "r.toml"
    toml.write_text('port = 7000\npolicy = "session"\nlog_format = "json"\n'
                    'engine = ["http://t:1"]\n')
    monkeypatch.setenv("DEEPINFER_PORT", "7100")
    monkeypatch.setenv("DEEPINFER_POLICY", "least-conn")
    s = load_settings(RouterSettings, {"port": "7200"}, toml, ENV_PREFIX)
    assert s.port == 7200  # flag
    assert s.policy == "least-conn"  # env over TOML
    assert s.log_format == "json"  # TOML over default
    assert s.engine == ["http://t:1"]
    assert s.host == "0.0.0.0"  # default


def test_repeatable_flags_and_comma_separated_env(monkeypatch):
    monkeypatch.setenv("DEEPINFER_API_KEY", "k1, k2")
    s = load(["--engine", "http://a:1", "--engine", "http://b:2/v1"])
    assert s.engine == ["http://a:1", "http://b:2/v1"]
    assert s.api_key == ["k1", "k2"]


def test_default_policy_is_kv_aware():
    assert RouterSettings().policy == "kv-aware"


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["--port", "99999"], "--port"),
        (["--policy", "fastest"], "--policy"),
        (["--engine", "ftp://x"], "--engine"),
        (["--max-body-mb", "-1"], "--max-body-mb"),
        (["--redis-url", "http://x"], "--redis-url"),
    ],
)
def test_bad_value_stops_with_one_clear_line(argv, option):
    proc = subprocess.run(
        [sys.executable, "-m", "deepinfer_router.cli", *argv],
        capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    if option == "--policy":  # argparse's own choices check: also one usage + one error
        assert "invalid choice" in proc.stderr
        return
    assert len(lines) == 1, proc.stderr
    assert option in lines[0]


def test_bad_env_value_names_the_option(monkeypatch):
    monkeypatch.setenv("DEEPINFER_SCRAPE_INTERVAL_S", "soon")
    with pytest.raises(SettingsError, match="--scrape-interval-s"):
        load_settings(RouterSettings, {}, None, ENV_PREFIX)


def test_unknown_toml_key_is_refused(tmp_path):
    toml = tmp_path / "r.toml"
    toml.write_text("portt = 1\n")
    with pytest.raises(SettingsError, match="portt"):
        load_settings(RouterSettings, {}, toml, ENV_PREFIX)


def test_example_toml_is_current_and_loads():
    path = ROOT / "configs" / "router.toml"
    expected = render_example_toml(RouterSettings, "deepinfer-router settings", ENV_PREFIX)
    assert path.read_text().strip() == expected.strip(), (
        "configs/router.toml is stale: run `deepinfer-router --print-config-example "
        "> configs/router.toml`"
    )
    assert load_settings(RouterSettings, {}, path, ENV_PREFIX) == RouterSettings()


def test_every_flag_documented_in_help_and_readme():
    help_text = subprocess.run(
        [sys.executable, "-m", "deepinfer_router.cli", "--help"],
        capture_output=True, text=True, timeout=30,
    ).stdout
    readme = (ROOT / "README.md").read_text()
    for name, info in RouterSettings.model_fields.items():
        if info.get_default(call_default_factory=True) == {}:  # a TOML table, no flag
            assert f"[{name}.NAME]" in help_text and f"[{name}.NAME]" in readme
            continue
        assert flag_name(name) in help_text
        assert flag_name(name) in readme, f"{flag_name(name)} missing from README"


def test_grafana_dashboard_is_valid_json_with_deepinfer_queries():
    dash = json.loads((ROOT / "configs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert exprs and all(re.search(r"deepinfer_\w+", e) for e in exprs)


def test_generated_docs_are_current():
    """configs/*.toml and the README option tables come from the settings classes."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_docs.py"), "--check"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
