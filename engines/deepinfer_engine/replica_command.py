"""What the agent runs for one replica: the `vllm serve` arguments a deployment spec
implies, and for `backend: docker` the exact `docker run` command and its stop command.
Pure (strings in, lists out), so the argv is tested without a Docker engine."""

from __future__ import annotations

import re

from deepinfer_router.shared.deployment import DeploymentSpec

CONTAINER_PORT = 8000  # vLLM's default in the vllm/vllm-openai image
CONTAINER_MODEL_DIR = "/model"


def replica_name(deployment_id: str, index: int) -> str:
    """`<deployment id>-<index>`: container names, log files."""
    return f"{deployment_id}-{index}"


def spec_engine_args(spec: DeploymentSpec) -> list[str]:
    """The spec's `vllm serve` options beyond model, host, port, TP and memory, which
    the launch machinery adds itself."""
    args: list[str] = []
    if spec.max_model_len is not None:
        args += ["--max-model-len", str(spec.max_model_len)]
    if spec.dtype is not None:
        args += ["--dtype", spec.dtype]
    if spec.quantization is not None:
        args += ["--quantization", spec.quantization]
    return [*args, *spec.extra_args]


def container_name(deployment_id: str, index: int) -> str:
    name = f"deepinfer-{replica_name(deployment_id, index)}"
    return re.sub(r"[^a-zA-Z0-9_.-]", "-", name)  # docker's name alphabet


def docker_run_argv(
    spec: DeploymentSpec, *, name: str, gpu_uuids: list[str], port: int
) -> list[str]:
    """`docker run --rm --name NAME --gpus '"device=UUID,..."' --ipc=host -p PORT:8000
    -v MODEL_PATH:/model:ro IMAGE --model /model [vLLM args]`.

    The `--gpus` value carries its own double quotes: docker parses it as CSV, where an
    unquoted comma would split the device list. `--ipc=host`: vLLM's tensor-parallel
    workers share memory through /dev/shm."""
    assert spec.docker_image and spec.model_path
    argv = ["docker", "run", "--rm", "--name", name]
    if gpu_uuids:
        argv += ["--gpus", f'"device={",".join(gpu_uuids)}"']
    argv += [
        "--ipc=host", "-p", f"{port}:{CONTAINER_PORT}",
        "-v", f"{spec.model_path}:{CONTAINER_MODEL_DIR}:ro",
        spec.docker_image,
        "--model", CONTAINER_MODEL_DIR,
        "--served-model-name", spec.served_name,
        "--tensor-parallel-size", str(spec.tensor_parallel_size),
    ]
    if spec.gpu_memory_utilization is not None:
        argv += ["--gpu-memory-utilization", f"{spec.gpu_memory_utilization:g}"]
    return [*argv, *spec_engine_args(spec)]


def docker_stop_argv(name: str, timeout_s: float) -> list[str]:
    """Stopping the client process would leave the container running: stop the
    container (SIGTERM, then SIGKILL after the timeout, as for a native engine)."""
    return ["docker", "stop", "--time", str(max(0, int(timeout_s))), name]


def docker_rm_argv(name: str) -> list[str]:
    """Remove the container whatever its state (a leftover of a crash, or one that did
    not stop within the budget)."""
    return ["docker", "rm", "--force", name]


def container_of(argv: list[str]) -> str | None:
    """The container name of a `docker run` command line this module built, else None."""
    if argv[:2] == ["docker", "run"] and "--name" in argv:
        i = argv.index("--name")
        return argv[i + 1] if i + 1 < len(argv) else None
    return None
