"""Launch settings: flags > env > TOML > defaults, `--` pass-through, and configs/engine.toml
kept in step with the settings class."""

from __future__ import annotations

from pathlib import Path

import pytest

from deepinfer_engine.cli import parse_launch
from deepinfer_engine.launch_settings import ENV_PREFIX, LaunchSettings
from deepinfer_router.shared.settings_loader import render_example_toml

pytestmark = pytest.mark.timeout(10)

ROOT = Path(__file__).resolve().parents[2]


def test_example_toml_matches_settings() -> None:
    expected = render_example_toml(
        LaunchSettings, "deepinfer-engine launch: example settings (every option, with its "
        "default)", ENV_PREFIX)
    assert (ROOT / "configs" / "engine.toml").read_text() == expected, (
        "configs/engine.toml is stale: regenerate it with render_example_toml")


def test_example_toml_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in LaunchSettings.model_fields:
        monkeypatch.delenv(ENV_PREFIX + name.upper(), raising=False)
    s = parse_launch(["m", "--config", str(ROOT / "configs" / "engine.toml")])
    assert s.model_dump() == LaunchSettings(model="m").model_dump()


def test_precedence_and_passthrough(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml = tmp_path / "engine.toml"
    toml.write_text('model = "from-toml"\nport = 9001\ntp = 2\nextra_args = ["--a", "x y"]\n'
                    'gpus = "0,1"\n')
    monkeypatch.setenv("DEEPINFER_ENGINE_PORT", "9002")
    monkeypatch.setenv("DEEPINFER_ENGINE_GPUS", "none")
    s = parse_launch(["--config", str(toml), "--gpus", "auto"])
    assert (s.model, s.port, s.tp, s.gpus, s.extra_args) == (
        "from-toml", 9002, 2, "auto", ["--a", "x y"])
    s = parse_launch(["cli-model", "--config", str(toml), "--port", "9003", "--",
                      "--max-num-seqs", "8", "--port-like=1"])
    assert (s.model, s.port, s.gpus) == ("cli-model", 9003, "none")
    assert s.extra_args == ["--max-num-seqs", "8", "--port-like=1"]
    monkeypatch.setenv("DEEPINFER_ENGINE_EXTRA_ARGS", "--chat-template 'a b'")
    assert parse_launch(["m"]).extra_args == ["--chat-template", "a b"]


def test_bad_values_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_launch(["m", "--gpus", "zero"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "--gpus" in err and "DEEPINFER_ENGINE_GPUS" in err and len(err.splitlines()) == 1
    with pytest.raises(SystemExit):
        parse_launch(["--port", "1"])  # no MODEL
    with pytest.raises(SystemExit):
        parse_launch(["m", "--gpu-memory-utilization", "1.5"])


def test_defaults() -> None:
    s = LaunchSettings(model="m")
    assert s.gpus == "auto" and s.tp is None and s.gpu_memory_utilization is None
    assert s.ready_check_completion and s.ready_timeout_s >= 600
    assert LaunchSettings(model="m", gpus=" 0, 1 ").gpus == "0,1"
    assert LaunchSettings(model="m", labels=["zone=a", "tier=x"]).label_dict() == {
        "zone": "a", "tier": "x"}
