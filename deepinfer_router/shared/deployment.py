"""Declarative deployments: what an operator asks for (`DeploymentSpec`, the body of
`POST /v1/deployments`), the stored deployment, each replica's observed state, and each
agent's host record. Shared by the router's API, the agents and the CLI front-ends, so
all three read and write one shape (the Redis side: deployment_store.py)."""

from __future__ import annotations

import re
import time
import uuid
from typing import Literal

import xxhash
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator


class DeploymentConflict(Exception):
    """The request contradicts what is stored (the message says how)."""


class DeploymentNotFound(Exception):
    pass


ReplicaState = Literal["Pending", "Starting", "Running", "Failed", "Stopping"]
Backend = Literal["native", "docker"]
Dtype = Literal["auto", "half", "float16", "bfloat16", "float", "float32"]

# Labels become Redis values, engine-record labels and table cells: keep them tame.
_LABEL_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}")
_LABEL_VALUE = re.compile(r"[A-Za-z0-9._:/-]{0,63}")
# A model: a Hugging Face id (org/name) or a path; never a flag, never a control character.
_NAME = r"^[^\s\x00-\x1f\x7f-][^\x00-\x1f\x7f]*$"
_DEVICE = re.compile(r"^(\d+|GPU-[0-9A-Za-z-]+)$")
HOST_LABEL = "host"  # every agent labels itself host=<agent id>: `device` needs it


def parse_labels(items: list[str]) -> dict[str, str]:
    """`k=v` strings (CLI flags) to a dict; ValueError naming the bad item."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"label must be key=value: {item!r}")
        out[key.strip()] = value.strip()
    return check_labels(out)


def check_labels(labels: dict[str, str]) -> dict[str, str]:
    for key, value in labels.items():
        if not _LABEL_KEY.fullmatch(key):
            raise ValueError(f"label key {key!r}: 1-63 of A-Z a-z 0-9 . _ / -")
        if not _LABEL_VALUE.fullmatch(value):
            raise ValueError(f"label {key}={value!r}: value of at most 63 A-Z a-z 0-9 . _ : / -")
    return labels


class DeploymentSpec(BaseModel):
    """What to serve and where; the body of POST /v1/deployments."""

    model_config = ConfigDict(extra="forbid")

    # Names and paths become positional arguments, container names and Redis values: no
    # control characters, and no leading "-" (it would be read as a vLLM flag that the
    # agents' allow-lists never see).
    model: str = Field(min_length=1, max_length=512, pattern=_NAME)
    served_model_name: str | None = Field(
        None, min_length=1, max_length=256, pattern=r"^[^\s\x00-\x1f\x7f-]\S*$"
    )
    replicas: int = Field(1, ge=0, le=1024, strict=True)
    tensor_parallel_size: int = Field(1, ge=1, le=64, strict=True)
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    max_model_len: int | None = Field(None, ge=1, strict=True)
    dtype: Dtype | None = None
    quantization: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")
    extra_args: list[str] = Field(default_factory=list, max_length=128)
    labels: dict[str, str] = Field(default_factory=dict, max_length=32)
    backend: Backend = "native"
    docker_image: str | None = Field(None, min_length=1, max_length=512,
                                     pattern=r"^[A-Za-z0-9][A-Za-z0-9._/:@-]*$",
                                     validate_default=True)
    # `:` and `,` would change the meaning of docker's `-v SRC:DST:ro`.
    model_path: str | None = Field(None, min_length=1, max_length=4096,
                                   pattern=r"^/[^\x00-\x1f\x7f:,]*$", validate_default=True)
    device: str | None = Field(None, max_length=1024, validate_default=True)

    # Cross-field checks are field validators on the later field (earlier fields are in
    # info.data), so a 422 names the field at fault.

    @field_validator("served_model_name")
    @classmethod
    def _same_name_is_none(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value == info.data.get("model") else value

    @field_validator("extra_args")
    @classmethod
    def _args(cls, value: list[str]) -> list[str]:
        for arg in value:
            if len(arg) > 4096 or any(ord(c) < 32 or ord(c) == 127 for c in arg):
                raise ValueError("each argument: at most 4096 characters, no control "
                                 "characters")
        return value

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        return check_labels(value)

    @field_validator("docker_image")
    @classmethod
    def _image(cls, value: str | None, info: ValidationInfo) -> str | None:
        docker = info.data.get("backend") == "docker"
        if docker and not value:
            raise ValueError("backend docker needs docker_image")
        if value and not docker:
            raise ValueError("only for backend docker")
        return value

    @field_validator("model_path")
    @classmethod
    def _model_path(cls, value: str | None, info: ValidationInfo) -> str | None:
        docker = info.data.get("backend") == "docker"
        if docker and not value:
            raise ValueError("backend docker needs model_path (an absolute path on the host)")
        if value and not docker:
            raise ValueError("only for backend docker")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        parts = [p.strip() for p in value.split(",") if p.strip()]
        if not parts or not all(_DEVICE.match(p) for p in parts) or len(set(parts)) != len(parts):
            raise ValueError("must be distinct GPU indices or UUIDs, comma-separated (0,1)")
        if info.data.get("replicas") != 1:
            raise ValueError("explicit GPUs need replicas: 1")
        if HOST_LABEL not in (info.data.get("labels") or {}):
            raise ValueError("explicit GPUs need labels naming one host: "
                             f"{{\"{HOST_LABEL}\": NAME}}")
        if len(parts) != info.data.get("tensor_parallel_size"):
            raise ValueError("must name tensor_parallel_size GPUs")
        return ",".join(parts)

    @property
    def served_name(self) -> str:
        return self.served_model_name or self.model

    def differences(self, other: DeploymentSpec) -> list[str]:
        """Names of the fields whose values differ (for a 409's message)."""
        mine, theirs = self.model_dump(), other.model_dump()
        return [name for name in mine if mine[name] != theirs[name]]


def deployment_id_for(served_name: str) -> str:
    """Stable id per served model name: one deployment serves a name at a time."""
    return "d-" + xxhash.xxh64_hexdigest(served_name.encode())[:10]


class Deployment(BaseModel):
    """A stored deployment: the desired spec and its generation (bumped on each change,
    so agents and readers can tell which version a replica's status reflects)."""

    id: str
    # New for every creation: an id is a hash of the served name, so the same id can
    # name a later deployment with another spec; claims and engines carry the uid.
    uid: str = Field(default_factory=lambda: uuid.uuid4().hex[:16])
    spec: DeploymentSpec
    generation: int = 1
    slots: int = 0  # replica indices ever used (surplus claims live below this)
    deleting: bool = False
    created_at: float = 0.0
    updated_at: float = 0.0


class ReplicaStatus(BaseModel):
    """One replica as its agent last reported it."""

    deployment: str
    index: int
    state: ReplicaState = "Pending"
    host: str | None = None
    gpus: list[int] = Field(default_factory=list)
    gpu_uuids: list[str] = Field(default_factory=list)
    engine_id: str | None = None
    url: str | None = None
    attempts: int = 0  # failed starts on `host` this generation
    last_error: str | None = None
    log_tail: str | None = None
    since: float = 0.0
    generation: int = 0  # the deployment generation this status was written for
    failed_hosts: list[str] = Field(default_factory=list)


class HostGpu(BaseModel):
    index: int
    uuid: str
    name: str = ""
    memory_total: int = 0
    memory_free: int = 0
    compute_capability: str | None = None
    replica: str | None = None  # "<deployment id>/<index>" using it, if any


class HostRecord(BaseModel):
    """A live agent: its labels, GPUs and load, rewritten on every heartbeat."""

    id: str
    hostname: str = ""
    labels: dict[str, str] = Field(default_factory=dict)
    gpus: list[HostGpu] = Field(default_factory=list)
    cpu_only: bool = False
    max_engines: int | None = None
    replicas: list[str] = Field(default_factory=list)
    started_at: float = 0.0
    heartbeat_at: float = 0.0
    lease_s: float = 0.0


def deployment_view(dep: Deployment, statuses: list[ReplicaStatus | None],
                    claims: list[str | None], now: float | None = None) -> dict[str, object]:
    """What GET /v1/deployments/{id} answers: the spec, generation, and per replica what
    its agent observed (Pending for a slot nobody has claimed yet)."""
    now = time.time() if now is None else now
    replicas = []
    wanted = 0 if dep.deleting else dep.spec.replicas
    for i in range(max(len(statuses), wanted)):
        status = statuses[i] if i < len(statuses) else None
        holder = claims[i] if i < len(claims) else None
        if status is None and holder is None and i >= wanted:
            continue
        if status is not None and status.state != "Failed" and holder != status.host:
            # Its host's lease lapsed (or it released it): what it reported is history.
            status = status.model_copy(update={
                "state": "Pending", "last_error": f"lost by {status.host} (lease lapsed)"
                if holder is None else status.last_error})
        view = (status or ReplicaStatus(deployment=dep.id, index=i)).model_dump()
        view["claimed_by"] = holder
        view["desired"] = i < wanted
        if status is not None and status.generation < dep.generation and status.state != "Failed":
            view["stale"] = True  # the agent has not yet acted on the latest generation
        view["since_s"] = round(now - status.since, 1) if status and status.since else None
        replicas.append(view)
    running = sum(1 for r in replicas if r["state"] == "Running" and r["desired"])
    return {
        "id": dep.id, "spec": dep.spec.model_dump(), "served_model_name": dep.spec.served_name,
        "generation": dep.generation, "deleting": dep.deleting,
        "created_at": dep.created_at, "updated_at": dep.updated_at,
        "replicas_wanted": wanted, "replicas_running": running, "replicas": replicas,
    }

