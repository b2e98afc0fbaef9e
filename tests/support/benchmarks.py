"""Import a script of benchmarks/ as a module (they are scripts, not a package), so that
unit tests can check their pure parts."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_benchmark(filename: str, module_name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(module_name, BENCHMARKS / filename)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while defined
    spec.loader.exec_module(module)
    return module
