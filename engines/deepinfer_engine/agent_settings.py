"""`deepinfer-engine agent` settings: the host options `launch` has (engine command,
GPUs, supervision, state directory), the shared Redis, and what is the agent's own:
identity, ports, leases, failure limits and allow-lists. Flags, DEEPINFER_AGENT_* env
vars and TOML keys are derived from the field names (see settings_loader)."""

from __future__ import annotations

import socket

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from deepinfer_router.shared.deployment import HOST_LABEL, parse_labels
from deepinfer_router.shared.registry_url import registry_kind
from deepinfer_router.shared.settings_loader import CsvList

from .launch_settings import EngineHostOptions
from .registration import RegistrationOptions

ENV_PREFIX = "DEEPINFER_AGENT_"


class AgentSettings(BaseSettings, RegistrationOptions, EngineHostOptions):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    agent_id: str = Field(
        "", pattern=r"^([A-Za-z0-9][A-Za-z0-9._-]{0,62})?$",
        description="This agent's name: its claims, its host record and the `host` label "
        "(default: the host name). Keep it across restarts, so the agent finds its engines.",
    )
    advertise_host: str | None = Field(
        None, description="Host name or address routers use to reach this host's engines "
        "(default: this host's fully qualified name)."
    )
    port_range: str = Field(
        "8100-8199", pattern=r"^\d{1,5}-\d{1,5}$",
        description="Ports the agent's engines listen on (FIRST-LAST)."
    )
    max_engines: int | None = Field(
        None, ge=0, description="Most engines this host runs (required with --gpus none; "
        "with GPUs, free GPUs limit it)."
    )
    lease_s: float = Field(
        30.0, gt=0, description="How long a claim on a replica lasts without renewal; "
        "another host takes it over after that. Renewed every third of it. At least 4x "
        "--registry-ttl-s (see --fence-margin-s)."
    )
    fence_margin_s: float | None = Field(
        None, gt=0, description="Stop this host's engines when renewals have failed for "
        "the lease minus this margin, so no replica runs twice: half of it is the budget "
        "for stopping them, and it must be at least twice --registry-ttl-s (default: half "
        "the lease)."
    )
    reconcile_interval_s: float = Field(
        5.0, gt=0, description="Longest time between two reconcile passes (a change "
        "notice starts one at once)."
    )
    attempts_per_host: int = Field(
        3, ge=1, description="Failed starts of a replica on this host before it is "
        "released for another host to try."
    )
    max_failed_hosts: int = Field(
        3, ge=1, description="Hosts a replica may fail on before it stays Failed (until "
        "its deployment is changed or deleted)."
    )
    drain_timeout_s: float = Field(
        30.0, ge=0, description="When a replica is scaled away or deleted: how long "
        "in-flight requests get to finish after it is deregistered."
    )
    allow_image: CsvList = Field(
        default_factory=list, description="Container image pattern (shell glob) this host "
        "may run for backend docker; repeatable. None: no containers."
    )
    allow_model_root: CsvList = Field(
        default_factory=list, description="Directory under which a model given as a local "
        "path (and a docker model_path) must lie; repeatable. Hugging Face ids are always "
        "accepted."
    )
    allow_extra_arg: CsvList = Field(
        default_factory=list, description="vLLM flag a deployment's extra_args may use, "
        "with or without its dashes (enable-prefix-caching, or "
        "--allow-extra-arg=--enable-prefix-caching); repeatable. None: no extra arguments."
    )
    capabilities_file: str | None = Field(
        None, description="Compute-capability table for dtype and quantization (default: "
        "configs/gpu-capabilities.toml)."
    )

    @field_validator("registry")
    @classmethod
    def _shared_redis(cls, url: str | None) -> str | None:
        if not url or registry_kind(url) != "redis":
            raise ValueError("the agent needs the shared Redis: redis://... (rediss://, "
                             "unix://)")
        return url

    @field_validator("labels")
    @classmethod
    def _host_labels(cls, value: list[str]) -> list[str]:
        parse_labels(value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> AgentSettings:
        if not self.agent_id:
            self.agent_id = socket.gethostname().split(".")[0] or "agent"
        if not self.registry:
            raise ValueError("--registry redis://... is required (the shared Redis)")
        first, last = self.ports()
        if not 1 <= first <= last <= 65535:
            raise ValueError("port_range must be FIRST-LAST within 1-65535")
        if self.gpus == "none" and self.max_engines is None:
            raise ValueError("--gpus none needs --max-engines N (how many engines this host "
                             "can run)")
        if self.fence_after_s() <= 0:
            raise ValueError("fence_margin_s must be shorter than lease_s")
        # Fenced at lease - margin, stopped within margin / 2, its registration gone
        # registry_ttl_s after its last heartbeat: all before another host's claim.
        if self.registry_ttl_s > self.fence_margin() / 2:
            raise ValueError("registry_ttl_s must be at most half the fence margin (by "
                             "default a quarter of lease_s), so a replica's old engine is "
                             "out of the registry before another host takes it over")
        return self

    def ports(self) -> tuple[int, int]:
        first, last = self.port_range.split("-")
        return int(first), int(last)

    def fence_after_s(self) -> float:
        return self.lease_s - self.fence_margin()

    def fence_margin(self) -> float:
        return self.fence_margin_s if self.fence_margin_s is not None else self.lease_s / 2

    def host_labels(self) -> dict[str, str]:
        """The labels deployments select on: the configured ones, plus host=<agent id>
        and device=gpu|cpu."""
        return {**parse_labels(self.labels), HOST_LABEL: self.agent_id,
                "device": "cpu" if self.gpus == "none" else "gpu"}
