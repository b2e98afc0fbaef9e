"""`deepinfer-engine sim serve MODEL [vllm serve flags]`: the simulator started with the
command line `vllm serve` takes, so anything that launches vLLM (`launch`, the agent,
`--engine-cmd "deepinfer-engine sim serve"`) can launch a simulated engine instead.

The flags that shape what the simulator models map onto its own options; those that only
matter to a real GPU (tensor parallelism, memory share, dtype, quantization, prefix
caching switches) are accepted and have no effect here. Anything else is refused, as
vLLM refuses an unknown flag."""

from __future__ import annotations

import argparse

# vLLM flag -> sim flag, for the ones the simulator models.
MAPPED = {
    "--host": "--host",
    "--port": "--port",
    "--max-model-len": "--max-model-len",
    "--max-num-seqs": "--max-num-seqs",
    "--max-num-batched-tokens": "--max-num-batched-tokens",
    "--block-size": "--block-size",
    "--kv-events-config": "--kv-events-config",
    "--scheduling-policy": "--scheduling-policy",
}
# Accepted for compatibility; meaningless without a GPU.
IGNORED_WITH_VALUE = ("--tensor-parallel-size", "--pipeline-parallel-size",
                      "--gpu-memory-utilization", "--dtype", "--quantization", "--seed",
                      "--kv-cache-dtype", "--swap-space", "--download-dir")
IGNORED_SWITCHES = ("--enable-prefix-caching", "--no-enable-prefix-caching",
                    "--enforce-eager", "--trust-remote-code", "--disable-log-requests")


def to_sim_argv(argv: list[str]) -> list[str]:
    """vLLM's `serve` arguments to `deepinfer-engine sim` arguments (SystemExit 2 with
    argparse's message for an unknown flag, as vLLM)."""
    p = argparse.ArgumentParser(prog="deepinfer-engine sim serve",
                                usage="deepinfer-engine sim serve MODEL [vllm serve flags]")
    p.add_argument("model_tag", nargs="?")
    p.add_argument("--model")
    p.add_argument("--served-model-name", nargs="+")
    for flag in MAPPED:
        p.add_argument(flag)
    for flag in IGNORED_WITH_VALUE:
        p.add_argument(flag)
    for flag in IGNORED_SWITCHES:
        p.add_argument(flag, action="store_true")
    ns = vars(p.parse_args(argv))
    model = (ns["served_model_name"] or [None])[0] or ns["model"] or ns["model_tag"]
    out = ["--model", model] if model else []
    for flag, sim_flag in MAPPED.items():
        value = ns[flag[2:].replace("-", "_")]
        if value is not None:
            out += [sim_flag, value]
    return out
