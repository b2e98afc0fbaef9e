"""Regenerate the documents derived from the settings classes: configs/router.toml and
the option tables in README.md (between the `<!-- ...:start -->` / `:end` markers).

    python scripts/gen_docs.py          # rewrite
    python scripts/gen_docs.py --check  # exit 1 if anything is stale (the tests do this)
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's code, whatever copy pip installed

from pydantic_settings import BaseSettings  # noqa: E402

from deepinfer_router.settings import ENV_PREFIX, RouterSettings  # noqa: E402
from deepinfer_router.shared.settings_loader import flag_name, render_example_toml  # noqa: E402


def flag_table(cls: type[BaseSettings], env_prefix: str) -> str:
    rows = ["| flag | env | default | meaning |", "|---|---|---|---|"]
    for name, info in cls.model_fields.items():
        default = info.get_default(call_default_factory=True)
        shown = "" if default in (None, [], "", {}) else f"`{default}`"
        desc = (info.description or "").replace("|", "/").replace("\n", " ")
        flag = f"`{flag_name(name)}`" if default != {} else f"TOML `[{name}.NAME]`"
        rows.append(f"| {flag} | `{env_prefix}{name.upper()}` | {shown} | {desc} |")
    return "\n".join(rows)


def tables() -> dict[str, str]:
    out = {"router-flags": flag_table(RouterSettings, ENV_PREFIX)}
    try:  # the engine manager's settings, when present
        from deepinfer_engine.launch_settings import ENV_PREFIX as ENGINE_PREFIX
        from deepinfer_engine.launch_settings import LaunchSettings

        out["engine-launch-flags"] = flag_table(LaunchSettings, ENGINE_PREFIX)
    except ImportError:
        pass
    try:
        from deepinfer_engine.agent_settings import ENV_PREFIX as AGENT_PREFIX
        from deepinfer_engine.agent_settings import AgentSettings

        out["engine-agent-flags"] = flag_table(AgentSettings, AGENT_PREFIX)
    except ImportError:
        pass
    try:
        from deepinfer_engine.sim.settings import SimSettings

        out["engine-sim-flags"] = flag_table(SimSettings, "DEEPINFER_ENGINE_")
    except ImportError:
        pass
    return out


def render_readme(text: str) -> str:
    for key, table in tables().items():
        start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
        if start in text and end in text:
            head, rest = text.split(start, 1)
            _, tail = rest.split(end, 1)
            text = f"{head}{start}\n{table}\n{end}{tail}"
    return text


def expected_files() -> dict[Path, str]:
    from deepinfer_engine.agent_settings import ENV_PREFIX as AGENT_PREFIX
    from deepinfer_engine.agent_settings import AgentSettings
    from deepinfer_engine.launch_settings import ENV_PREFIX as ENGINE_PREFIX
    from deepinfer_engine.launch_settings import LaunchSettings
    from deepinfer_engine.sim.settings import SimSettings

    readme = ROOT / "README.md"
    configs = ROOT / "configs"
    return {
        configs / "router.toml": render_example_toml(
            RouterSettings, "deepinfer-router settings", ENV_PREFIX
        ).rstrip() + "\n",
        configs / "engine.toml": render_example_toml(
            LaunchSettings,
            "deepinfer-engine launch: example settings (every option, with its default)",
            ENGINE_PREFIX,
        ),
        configs / "agent.toml": render_example_toml(
            AgentSettings,
            "deepinfer-engine agent: example settings (every option, with its default)",
            AGENT_PREFIX,
        ),
        configs / "engine-sim.toml": render_example_toml(
            SimSettings,
            "deepinfer-engine sim: example settings (every option, with its default)",
            ENGINE_PREFIX,
        ),
        readme: render_readme(readme.read_text()),
    }


def main(argv: list[str]) -> int:
    stale = [p for p, text in expected_files().items() if not p.exists() or p.read_text() != text]
    if "--check" in argv:
        for path in stale:
            print(f"stale: {path.relative_to(ROOT)} (run python scripts/gen_docs.py)")
        return 1 if stale else 0
    for path, text in expected_files().items():
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
