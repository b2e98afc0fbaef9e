"""The engine record: defined once, shared by the router, the registry backends and the
engine manager (see ARCHITECTURE.md)."""

from __future__ import annotations

import re
import uuid

import xxhash
from pydantic import BaseModel, ConfigDict, Field, field_validator


class Capacity(BaseModel):
    """What an engine can hold, each field only when known."""

    model_config = ConfigDict(extra="ignore")

    kv_blocks: int | None = Field(default=None, ge=0)
    block_size: int | None = Field(default=None, ge=1, description="tokens per KV block")
    max_model_len: int | None = Field(default=None, ge=1)
    max_num_seqs: int | None = Field(default=None, ge=1)

    def kv_tokens(self) -> int | None:
        if self.kv_blocks is None or self.block_size is None:
            return None
        return self.kv_blocks * self.block_size


def normalize_engine_url(url: str) -> str:
    """Base URL without a trailing slash or `/v1`: the form every record stores."""
    url = url.strip().rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    return url


def engine_id_for(url: str) -> str:
    """Stable id for an engine's address, so the same engine gets the same id everywhere."""
    return "e-" + xxhash.xxh64_hexdigest(normalize_engine_url(url).encode())[:12]


# Ids and instances appear in metrics labels, logs and admin URLs: keep them tame.
_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def new_instance_id() -> str:
    return uuid.uuid4().hex[:16]


class KvEventsEndpoints(BaseModel):
    """Where an engine's KV cache events can be had (see deepinfer_router/kv_events/):
    the feed (a ZMQ PUB socket to subscribe to), vLLM's replay socket and the topic."""

    model_config = ConfigDict(extra="ignore")

    endpoint: str = Field(pattern=r"^tcp://[^\s/]+:\d{1,5}$", max_length=300)
    replay_endpoint: str | None = Field(None, pattern=r"^tcp://[^\s/]+:\d{1,5}$",
                                        max_length=300)
    topic: str = Field("", max_length=256)


class EngineRecord(BaseModel):
    """One engine as registries store it and routers see it."""

    model_config = ConfigDict(extra="ignore")

    id: str = ""
    instance: str = Field(default_factory=new_instance_id)
    url: str
    models: list[str] = Field(default_factory=list)
    capacity: Capacity = Field(default_factory=Capacity)
    labels: dict[str, str] = Field(default_factory=dict)
    gpus: list[str] = Field(default_factory=list)
    version: str = ""
    kv_events: KvEventsEndpoints | None = None
    # A directory with the model's tokenizer (tokenizer.json, tokenizer_config.json,
    # chat_template.jinja) on the engine's host: routers on the same host or a shared
    # filesystem tokenize prompts with it (deepinfer_router/prompt_tokens/).
    tokenizer: str | None = Field(None, max_length=4096)
    started_at: float = 0.0
    heartbeat_at: float = 0.0

    @field_validator("id", "instance")
    @classmethod
    def _tame_token(cls, value: str) -> str:
        if value and not _TOKEN.fullmatch(value):
            raise ValueError("must be 1-128 of A-Z a-z 0-9 . _ : - (starting alphanumeric)")
        return value

    @field_validator("url")
    @classmethod
    def _url_is_http(cls, value: str) -> str:
        value = normalize_engine_url(value)
        if not (value.startswith("http://") or value.startswith("https://")):
            raise ValueError("engine url must start with http:// or https://")
        return value

    def model_post_init(self, __context: object) -> None:
        if not self.id:
            self.id = engine_id_for(self.url)
