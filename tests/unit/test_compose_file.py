"""compose.yaml brings up Redis (persistent), the router and two agents the declarative
way. Checked structurally here, and by `docker compose config` where Docker Compose is
installed (it need not run here)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_compose_declares_redis_router_and_two_agents() -> None:
    doc = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = doc["services"]
    redis = services["redis"]
    assert "--appendonly" in redis["command"] and "yes" in redis["command"]
    assert any(v.endswith(":/data") for v in redis["volumes"])
    router = services["router"]
    assert router["command"][router["command"].index("--redis-url") + 1] == "redis://redis:6379"
    assert "--admin-key" in router["command"]
    agents = [name for name, svc in services.items()
              if svc.get("entrypoint") == ["deepinfer-engine", "agent"]]
    assert sorted(agents) == ["agent-a", "agent-b"]
    for name in agents:
        svc = services[name]
        env = svc["environment"]
        assert env["DEEPINFER_AGENT_REGISTRY"] == "redis://redis:6379"
        assert env["DEEPINFER_AGENT_GPUS"] == "none" and int(env["DEEPINFER_AGENT_MAX_ENGINES"])
        assert env["DEEPINFER_AGENT_ENGINE_CMD"] == "deepinfer-engine sim serve"
        args = svc["command"]
        assert args[args.index("--agent-id") + 1] == name
        assert args[args.index("--advertise-host") + 1] == name
        state = args[args.index("--state-dir") + 1]
        assert any(v.endswith(":" + state) for v in svc["volumes"])  # adoption survives
    assert set(doc["volumes"]) >= {"redis-data", "agent-a-state", "agent-b-state"}


def test_docker_compose_accepts_it_where_installed() -> None:
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True,
                                        timeout=30).returncode != 0:
        return  # no Compose here: the structural test above is the check
    run = subprocess.run([docker, "compose", "-f", str(ROOT / "compose.yaml"), "config", "-q"],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "DEEPINFER_ADMIN_KEY": "test"})
    assert run.returncode == 0, run.stderr
