"""`deepinfer-engine launch` settings: every option once; flags, DEEPINFER_ENGINE_* env
vars and TOML keys are derived from the field names (see settings_loader)."""

from __future__ import annotations

import re
import shlex
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from deepinfer_router.shared.settings_loader import CsvList

from .registration import RegistrationOptions

ENV_PREFIX = "DEEPINFER_ENGINE_"


def _split_args(value: Any) -> Any:
    # The environment carries a shell-quoted string; TOML and `--` give a list.
    if isinstance(value, str):
        return shlex.split(value)
    return value


ArgList = Annotated[list[str], NoDecode, BeforeValidator(_split_args)]


class EngineHostOptions(BaseModel):
    """What every way of running engines on a host shares (`launch`, `agent`): the
    command, GPUs, listen address, labels, supervision and files."""

    engine_cmd: str | None = Field(
        None,
        description="Command replacing the `vllm serve` prefix (MODEL and the flags follow it "
        "unchanged), e.g. a container wrapper. Default: `vllm serve`, or `python -m "
        "vllm.entrypoints.openai.api_server --model` where the vllm script is unusable.",
    )
    gpus: str = Field(
        "auto",
        description="GPUs to use: auto (pick free ones), none (CPU build or stand-in "
        "command, no NVML), or indices/UUIDs such as 0,1 or GPU-..., or one MIG-... device.",
    )
    host: str = Field("0.0.0.0", description="Address vLLM listens on.")
    labels: CsvList = Field(
        default_factory=list, description="Label key=value added to the engine record; "
        "repeatable."
    )

    # --- readiness and supervision ------------------------------------------------------
    ready_timeout_s: float = Field(
        1800.0, gt=0, description="Longest wait for the engine to become ready (model download "
        "and load included)."
    )
    ready_check_completion: bool = Field(
        True, description="Require a 1-token completion before declaring the engine ready "
        "(turn off for embedding/pooling models)."
    )
    health_interval_s: float = Field(
        5.0, gt=0, description="Seconds between /health checks of a ready engine."
    )
    health_failures: int = Field(
        3, ge=1, description="Consecutive failed /health checks after which a hung engine is "
        "restarted."
    )
    max_restarts: int = Field(
        10, ge=0, description="Restarts after crashes before giving up (the count resets once "
        "the engine stays up for --restart-reset-s)."
    )
    restart_backoff_s: float = Field(
        2.0, ge=0, description="First delay before a restart; doubles on each crash."
    )
    restart_backoff_max_s: float = Field(
        300.0, ge=0, description="Longest delay between restarts."
    )
    restart_reset_s: float = Field(
        600.0, gt=0, description="Time an engine must run after becoming ready for the "
        "restart count and backoff to reset (loading time does not count)."
    )
    stop_timeout_s: float = Field(
        30.0, ge=0, description="On stop, seconds vLLM's process group gets after SIGTERM "
        "before SIGKILL."
    )

    state_dir: str | None = Field(
        None, description="Host-local state directory (running launches, GPU reservations; "
        "default /run/deepinfer if writable, else $XDG_RUNTIME_DIR/deepinfer or "
        "~/.local/state/deepinfer)."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level of the engine manager."
    )

    @field_validator("gpus")
    @classmethod
    def _gpus(cls, value: str) -> str:
        value = value.strip()
        if value in ("auto", "none"):
            return value
        parts = [p.strip() for p in value.split(",") if p.strip()]
        pattern = re.compile(r"^(\d+|GPU-[0-9A-Za-z-]+|MIG-[0-9A-Za-z/-]+)$")
        if not parts or not all(pattern.match(p) for p in parts):
            raise ValueError("must be auto, none, or a comma-separated list of GPU indices "
                             "or UUIDs")
        return ",".join(parts)

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: list[str]) -> list[str]:
        for item in value:
            if "=" not in item:
                raise ValueError(f"label must be key=value: {item!r}")
        return value

    def label_dict(self) -> dict[str, str]:
        return dict(item.split("=", 1) for item in self.labels)


class LaunchSettings(BaseSettings, RegistrationOptions, EngineHostOptions):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    # --- what to run ----------------------------------------------------------------
    model: str | None = Field(
        None, description="Model to serve (Hugging Face id or local path); the MODEL argument."
    )
    served_model_name: str | None = Field(
        None, description="Name the engine serves the model as (default: MODEL)."
    )
    extra_args: ArgList = Field(
        default_factory=list,
        description="Extra `vllm serve` arguments (on the command line: after `--`).",
    )

    scheduling_policy: Literal["fcfs", "priority"] | None = Field(
        None, description="vLLM's --scheduling-policy. With priority the engine is "
        "registered with the label scheduling-policy=priority, and routers pass each "
        "request's class as vLLM's request priority (router --engine-priority). Also "
        "read from the extra vLLM arguments."
    )

    # --- placement ------------------------------------------------------------------
    tp: int | None = Field(
        None, ge=1, description="Tensor-parallel size (default: the number of --gpus named, "
        "else 1)."
    )
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="Fraction of each GPU's memory vLLM may use (vLLM's "
        "default 0.9 with GPUs; not passed with --gpus none unless set)."
    )

    # --- network --------------------------------------------------------------------
    port: int = Field(8000, ge=1, le=65535, description="Port vLLM listens on.")
    advertise_url: str | None = Field(
        None, description="Base URL routers use to reach this engine (default: "
        "http://<this host's name>:PORT)."
    )

    kv_events: Literal["on", "off"] = Field(
        "on", description="Publish vLLM's KV cache events for precise routing: vLLM "
        "publishes on a private socket, the engine manager relays it on the advertised "
        "address (never all interfaces) and registers the endpoints."
    )

    # --- files ----------------------------------------------------------------------
    log_file: str | None = Field(
        None, description="File receiving the engine's stdout/stderr (default: "
        "<state dir>/logs/<engine id>.log)."
    )

    @field_validator("advertise_url")
    @classmethod
    def _empty_is_none(cls, value: str | None) -> str | None:
        return value or None
