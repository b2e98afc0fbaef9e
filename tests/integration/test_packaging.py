"""What the wheel installs: the router and the engine manager under their own names, and no
generic top-level module (an `engines` in site-packages would clash with other
distributions). Built from a copy of the sources, with the project's real build backend."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(180)


def test_wheel_installs_only_namespaced_packages(tmp_path: Path) -> None:
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("deepinfer_router", "engines"):
        shutil.copytree(ROOT / folder, src / folder, ignore=ignore)
    out = tmp_path / "dist"
    run = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "-q", "-w", str(out), str(src)],
        capture_output=True, text=True, timeout=170,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    (wheel,) = out.glob("deepinfer-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert top == {"deepinfer_router", "deepinfer_engine"}, top
    assert "deepinfer_engine/sim/server.py" in names
    assert "deepinfer_router/proxy/handler.py" in names
    # The agent's capability table travels with the package, as the file in configs/.
    table = zipfile.ZipFile(wheel).read("deepinfer_engine/gpu-capabilities.toml")
    assert table == (ROOT / "configs" / "gpu-capabilities.toml").read_bytes()
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "deepinfer-engine = deepinfer_engine.cli:main" in scripts
    assert "deepinfer-router = deepinfer_router.cli:main" in scripts
