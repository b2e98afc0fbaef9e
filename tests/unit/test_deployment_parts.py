"""The pure parts of declarative deployments: the spec's validation, placement (labels,
GPU count, memory, compute capability), the allow-lists and the docker command line."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from deepinfer_engine.allow_list import AllowList
from deepinfer_engine.gpus import Selection
from deepinfer_engine.nvml import GpuInfo, GpuSnapshot
from deepinfer_engine.placement import CapabilityTable, HostView, load_fraction, place
from deepinfer_engine.replica_command import container_name, docker_run_argv, docker_stop_argv
from deepinfer_router.shared.deployment import DeploymentSpec, deployment_id_for

GIB = 1024**3


def gpu(index: int, cc: str = "9.0", total_gib: int = 80, used_gib: float = 0.5) -> GpuInfo:
    total = total_gib * GIB
    used = int(used_gib * GIB)
    return GpuInfo(index=index, uuid=f"GPU-{index:04d}", name="NVIDIA H100", memory_total=total,
                   memory_used=used, memory_free=total - used, compute_capability=cc)


def host(*gpus: GpuInfo, labels: dict[str, str] | None = None, reserved: tuple[str, ...] = (),
         engines: int = 0, max_engines: int | None = None) -> HostView:
    return HostView(labels=labels or {"host": "a"}, snapshot=GpuSnapshot("550", list(gpus)),
                    reserved=reserved, engines=engines, max_engines=max_engines)


TABLE = CapabilityTable.load()


# --- the spec -----------------------------------------------------------------------------


def test_spec_defaults_and_served_name() -> None:
    spec = DeploymentSpec(model="Qwen/Qwen2.5-7B-Instruct")
    assert spec.replicas == 1 and spec.tensor_parallel_size == 1 and spec.backend == "native"
    assert spec.served_name == "Qwen/Qwen2.5-7B-Instruct"
    assert deployment_id_for(spec.served_name) == deployment_id_for("Qwen/Qwen2.5-7B-Instruct")


@pytest.mark.parametrize(("body", "field"), [
    ({}, "model"),
    ({"model": ""}, "model"),
    ({"model": "m", "replicas": -1}, "replicas"),
    ({"model": "m", "tensor_parallel_size": 0}, "tensor_parallel_size"),
    ({"model": "m", "gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
    ({"model": "m", "dtype": "int3"}, "dtype"),
    ({"model": "m", "quantization": "FP8; rm -rf"}, "quantization"),
    ({"model": "m", "labels": {"gpu": "h 100"}}, "labels"),
    ({"model": "m", "extra_args": "--x"}, "extra_args"),
    ({"model": "m", "backend": "podman"}, "backend"),
    ({"model": "m", "colour": "red"}, "colour"),
    ({"model": "--config=/etc/x.yaml"}, "model"),
    ({"model": "m\x00"}, "model"),
    ({"model": "m", "replicas": True}, "replicas"),
    ({"model": "m", "quantization": "-q"}, "quantization"),
    ({"model": "m", "backend": "docker", "docker_image": "i", "model_path": "/a:/etc"},
     "model_path"),
])
def test_spec_rejects_bad_fields_naming_them(body: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        DeploymentSpec.model_validate(body)
    assert info.value.errors()[0]["loc"][0] == field


@pytest.mark.parametrize("body", [
    {"model": "m", "backend": "docker", "docker_image": "vllm/vllm-openai:v0.9.0"},
    {"model": "m", "backend": "docker", "docker_image": "i", "model_path": "relative/dir"},
    {"model": "m", "docker_image": "i"},
    {"model": "m", "device": "0", "replicas": 2, "labels": {"host": "a"}},
    {"model": "m", "device": "0"},
    {"model": "m", "device": "0", "labels": {"host": "a"}, "tensor_parallel_size": 2},
    {"model": "m", "device": "0,0", "labels": {"host": "a"}, "tensor_parallel_size": 2},
])
def test_spec_rejects_inconsistent_combinations(body: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        DeploymentSpec.model_validate(body)


def test_differences_name_the_changed_fields() -> None:
    a = DeploymentSpec(model="m", replicas=2)
    b = DeploymentSpec(model="m", replicas=3, max_model_len=4096)
    assert a.differences(b) == ["replicas", "max_model_len"]
    assert a.differences(a.model_copy()) == []


# --- placement ----------------------------------------------------------------------------


def test_tp2_needs_two_free_gpus() -> None:
    spec = DeploymentSpec(model="m", tensor_parallel_size=2)
    assert isinstance(place(spec, host(gpu(0)), TABLE), str)
    assert isinstance(place(spec, host(gpu(0), gpu(1), reserved=("GPU-0001",)), TABLE), str)
    sel = place(spec, host(gpu(0), gpu(1), gpu(2), reserved=("GPU-0001",)), TABLE)
    assert sel == Selection([0, 2], ["GPU-0000", "GPU-0002"])


def test_memory_for_the_requested_utilization() -> None:
    busy = gpu(0, used_gib=40)  # 40 of 80 GiB free
    assert isinstance(place(DeploymentSpec(model="m"), host(busy), TABLE), str)  # 0.9 default
    assert isinstance(place(DeploymentSpec(model="m", gpu_memory_utilization=0.45),
                            host(busy), TABLE), Selection)


def test_labels_select_hosts() -> None:
    spec = DeploymentSpec(model="m", labels={"gpu": "h100"})
    assert place(spec, host(gpu(0), labels={"host": "a"}), TABLE) == "labels do not match"
    assert isinstance(place(spec, host(gpu(0), labels={"host": "a", "gpu": "h100"}), TABLE),
                      Selection)


def test_quantization_and_dtype_need_a_capable_gpu() -> None:
    t4, a100, h100 = gpu(0, cc="7.5"), gpu(1, cc="8.0"), gpu(2, cc="9.0")
    bf16 = DeploymentSpec(model="m", dtype="bfloat16")
    assert place(bf16, host(t4), TABLE).startswith("need 1 GPU")  # type: ignore[union-attr]
    assert place(bf16, host(t4, a100), TABLE) == Selection([1], ["GPU-0001"])
    fp8 = DeploymentSpec(model="m", quantization="fp8_per_channel")  # W8A8 only: 8.9
    reason = place(fp8, host(a100), TABLE)
    assert isinstance(reason, str) and "compute capability >= 8.9" in reason
    assert place(fp8, host(a100, h100), TABLE) == Selection([2], ["GPU-0002"])
    # The highest of the two minimums counts.
    both = DeploymentSpec(model="m", quantization="awq", dtype="bfloat16")
    assert TABLE.required(both)[0] == max(TABLE.quantization["awq"], TABLE.dtype["bfloat16"])


def test_capability_table_covers_vllms_common_methods() -> None:
    assert TABLE.dtype["bfloat16"] == (8, 0)
    assert TABLE.quantization["fp8"] == (7, 5)  # weight-only through Marlin below 8.9
    for name in ("fp8", "awq", "gptq", "awq_marlin", "gptq_marlin", "compressed-tensors"):
        assert name in TABLE.quantization


def test_explicit_device_and_engine_limit() -> None:
    spec = DeploymentSpec(model="m", device="1", labels={"host": "a"})
    assert place(spec, host(gpu(0), gpu(1)), TABLE) == Selection([1], ["GPU-0001"])
    assert isinstance(place(spec, host(gpu(0), gpu(1), reserved=("GPU-0001",)), TABLE), str)
    full = host(gpu(0), engines=2, max_engines=2)
    assert "max-engines" in str(place(DeploymentSpec(model="m"), full, TABLE))


def test_cpu_host_takes_replicas_up_to_its_limit() -> None:
    cpu = HostView(labels={"host": "c"}, snapshot=None, engines=1, max_engines=2)
    assert place(DeploymentSpec(model="m"), cpu, TABLE) == Selection([], [])
    assert load_fraction(cpu) == 0.5
    cpu_full = HostView(labels={"host": "c"}, snapshot=None, engines=2, max_engines=2)
    assert isinstance(place(DeploymentSpec(model="m"), cpu_full, TABLE), str)


def test_busier_hosts_wait_longer() -> None:
    idle = host(gpu(0), gpu(1))
    half = host(gpu(0), gpu(1), reserved=("GPU-0000",))
    assert load_fraction(idle) == 0.0 < load_fraction(half) == 0.5


# --- allow-lists --------------------------------------------------------------------------


def test_allow_lists() -> None:
    allow = AllowList(images=("vllm/vllm-openai:*",), model_roots=("/models",),
                      extra_args=("--enable-prefix-caching",))
    assert allow.refusal(DeploymentSpec(model="Qwen/Qwen2.5-7B")) is None
    assert allow.refusal(DeploymentSpec(model="/models/qwen")) is None
    assert "outside" in str(allow.refusal(DeploymentSpec(model="/models/../etc/qwen")))
    assert "outside" in str(allow.refusal(DeploymentSpec(model="/srv/qwen")))
    assert allow.refusal(DeploymentSpec(model="m", extra_args=["--enable-prefix-caching"])) is None
    assert "--trust-remote-code" in str(allow.refusal(
        DeploymentSpec(model="m", extra_args=["--trust-remote-code"])))
    docker = {"model": "m", "backend": "docker", "model_path": "/models/qwen"}
    assert allow.refusal(DeploymentSpec(**docker, docker_image="vllm/vllm-openai:v0.9")) is None
    assert "image" in str(allow.refusal(DeploymentSpec(**docker, docker_image="evil/miner:1")))
    assert "image" in str(AllowList().refusal(DeploymentSpec(**docker, docker_image="vllm/x")))
    assert "outside" in str(AllowList(images=("*",)).refusal(
        DeploymentSpec(**docker, docker_image="vllm/x")))


# --- docker ---------------------------------------------------------------------------------


def test_docker_argv_for_a_tp2_replica_is_exact() -> None:
    spec = DeploymentSpec(model="qwen", served_model_name="qwen-7b", backend="docker",
                          docker_image="vllm/vllm-openai:v0.9.0", model_path="/models/qwen",
                          tensor_parallel_size=2, max_model_len=8192,
                          extra_args=["--enable-prefix-caching"])
    name = container_name("d-0123456789", 1)
    assert name == "deepinfer-d-0123456789-1"
    argv = docker_run_argv(spec, name=name, gpu_uuids=["GPU-aaaa", "GPU-bbbb"], port=8101)
    assert argv == [
        "docker", "run", "--rm", "--name", "deepinfer-d-0123456789-1",
        "--gpus", '"device=GPU-aaaa,GPU-bbbb"', "--ipc=host", "-p", "8101:8000",
        "-v", "/models/qwen:/model:ro", "vllm/vllm-openai:v0.9.0",
        "--model", "/model", "--served-model-name", "qwen-7b", "--tensor-parallel-size", "2",
        "--max-model-len", "8192", "--enable-prefix-caching",
    ]
    assert docker_stop_argv(name, 30) == ["docker", "stop", "--time", "30", name]


def test_allow_list_paths_cannot_escape(tmp_path: Path) -> None:
    root = tmp_path / "models"
    (root / "qwen").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    (root / "link").symlink_to(tmp_path / "secret")
    allow = AllowList(model_roots=(str(root),))
    assert allow.refusal(DeploymentSpec(model=str(root / "qwen"))) is None
    for model in (str(root / "link"), str(root / "link" / "x"), "srv/models/x",
                  "models/qwen/../../x", "./qwen", str(root) + "/../secret"):
        assert "outside" in str(allow.refusal(DeploymentSpec(model=model))), model
