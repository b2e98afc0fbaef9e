"""Copy the results and targets tables of benchmarks/ROUTING.md into README.md (between the
`routing-summary` markers), so the README shows the latest measured routing figures."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def tables(markdown: str) -> list[str]:
    return [m.group(0).strip() for m in re.finditer(r"(?:^\|.*\|\n)+", markdown, re.M)]


def main() -> None:
    found = tables((ROOT / "benchmarks" / "ROUTING.md").read_text())
    results = next(t for t in found if "TTFT p50" in t)
    target_table = next(t for t in found if t.startswith("| target"))
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = "<!-- routing-summary:start -->", "<!-- routing-summary:end -->"
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{results}\n\nTargets:\n\n{target_table}\n{end}{tail}")


if __name__ == "__main__":
    main()
