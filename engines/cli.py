"""deepinfer-engine: command-line entry point. Each subcommand lives in its own module."""

from __future__ import annotations

import sys


USAGE = """usage: deepinfer-engine {gpus,launch,sim,list,stop} ...

  gpus     NVML table of this host's GPUs
  launch   start vLLM on selected GPUs, supervise and register it
  sim      run a simulated vLLM engine (no GPU)
  list     engines launched on this host, or registered in a registry
  stop     stop an engine launched on this host
"""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "sim":
        from .sim.main import main as sim_main

        return sim_main(rest)
    print(f"deepinfer-engine: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
