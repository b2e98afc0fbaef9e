"""Options of `deepinfer-engine sim`: every option once, with its flag, environment variable
(`DEEPINFER_ENGINE_<FLAG>`) and TOML key derived from the field name (see settings_loader).

The defaults of the cost model are calibrated to a 7-8B model on one H100; see cost.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from deepinfer_engine.registration import RegistrationOptions

ENV_PREFIX = "DEEPINFER_ENGINE_"

OutputLenDist = Literal["fixed", "uniform", "exponential", "lognormal"]


class SimSettings(BaseSettings, RegistrationOptions):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    # --- serving -------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on (0: any free port).")
    advertise_url: str | None = Field(
        None, description="Base URL registered for this engine (default: http://HOST:PORT, "
        "with 127.0.0.1 for a wildcard HOST)."
    )
    model: str = Field("sim-model", min_length=1, description="Model name served.")
    keepalive_s: float = Field(
        5.0, gt=0, description="Seconds an idle client connection is kept open before the "
        "engine closes it (vLLM's server: 5, VLLM_HTTP_TIMEOUT_KEEP_ALIVE)."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level."
    )

    # --- engine shape (vLLM's knobs) -------------------------------------------------------
    kv_blocks: int = Field(
        26_000, ge=1, description="KV cache blocks in all (vLLM's num_gpu_blocks). 26,000 x 16 "
        "tokens is what an 8B model leaves free on an 80 GB H100 at 0.9 utilisation."
    )
    block_size: int = Field(16, ge=1, le=1024, description="Tokens per KV cache block.")
    max_num_seqs: int = Field(256, ge=1, description="Most sequences running in one step.")
    scheduling_policy: Literal["fcfs", "priority"] = Field(
        "fcfs", description="vLLM's --scheduling-policy: fcfs (a request's `priority` other "
        "than 0 is refused, as vLLM does) or priority (waiting requests by `priority`, lower "
        "first, then arrival; a block shortage preempts the lowest-priority request).",
    )
    max_num_batched_tokens: int = Field(
        8192, ge=1, description="Token budget of one step (chunked prefill)."
    )
    max_model_len: int = Field(
        32_768, ge=2, description="Longest prompt plus output, in tokens (capped to what the "
        "KV cache holds)."
    )

    # --- cost model ----------------------------------------------------------------------
    speed: float = Field(
        1.0, gt=0, description="Run the clock X times faster: every modelled duration is "
        "divided by X."
    )
    step_overhead_ms: float = Field(
        6.0, ge=0, description="Fixed cost of one engine step (weights read, scheduling, launch)."
    )
    prefill_us_per_token: float = Field(
        40.0, ge=0, description="Cost of each uncached prompt token computed in a step."
    )
    decode_us_per_seq: float = Field(
        30.0, ge=0, description="Cost of each decoding sequence in a step."
    )
    decode_us_per_1k_context: float = Field(
        40.0, ge=0, description="Extra decode cost per 1,000 context tokens of a sequence "
        "(attention reads its KV cache)."
    )

    # --- outputs ---------------------------------------------------------------------------
    output_len_dist: OutputLenDist = Field(
        "lognormal", description="Output length distribution when a request sets no max_tokens."
    )
    output_len_mean: float = Field(
        200.0, ge=1, description="Mean output length (tokens) when max_tokens is absent."
    )
    output_len_max: int = Field(
        4096, ge=1, description="Cap on drawn output lengths (also capped by max_model_len)."
    )
    embedding_dim: int = Field(256, ge=1, le=8192, description="Length of /v1/embeddings vectors.")
    seed: int = Field(0, description="Seed of the simulator's random choices (lengths, faults).")

    # --- fault injection (tests); POST /admin/faults changes them at run time -----------
    fault_error_rate: float = Field(
        0.0, ge=0.0, le=1.0, description="Share of requests answered with a 500 error."
    )
    fault_ttft_delay_s: float = Field(
        0.0, ge=0.0, description="Extra wall-clock delay before a request starts (slow first "
        "token); streaming responses send their headers first."
    )
    fault_hang_rate: float = Field(
        0.0, ge=0.0, le=1.0, description="Share of requests whose first token never arrives "
        "(the response hangs until the client goes away)."
    )
    fault_drop_rate: float = Field(
        0.0, ge=0.0, le=1.0, description="Share of requests whose connection is dropped "
        "mid-response."
    )
    fault_drop_after_tokens: int = Field(
        1, ge=0, description="Tokens streamed before a dropped connection is cut."
    )
    fault_stall_rate: float = Field(
        0.0, ge=0.0, le=1.0, description="Share of streamed requests that go silent mid-stream "
        "(the connection stays open and nothing more is sent until the client goes away, while "
        "the model finishes the sequence: a hung API server or network path)."
    )
    fault_stall_after_tokens: int = Field(
        1, ge=0, description="Tokens streamed before a stalled stream goes silent."
    )

    kv_events_config: str | None = Field(
        None, description="vLLM's --kv-events-config JSON: with enable_kv_cache_events and "
        "publisher zmq, the simulator publishes its KV cache events on `endpoint` (bound) "
        "and serves `replay_endpoint`, as vLLM does."
    )
    tokenizer: str | None = Field(
        None, description="A Hugging Face tokenizer directory (tokenizer.json, chat template): "
        "prompts become that tokenizer's ids, as a real engine's are, and the engine record "
        "names the directory for routers. Default: the simulator's own stand-in tokenizer."
    )
    report_engine_ttft: bool = Field(
        False, description="Add the request's modelled queue + prefill time (model seconds) "
        "to a stream's usage chunk as x_sim_timing.engine_ttft_s (not in vLLM's answers; "
        "for benchmarks that count the rest of the time at wall-clock speed)."
    )
    kv_events_encoding: Literal["tagged", "positional"] = Field(
        "tagged", description="Event encoding: tagged (vLLM 0.32's maps) or positional (older "
        "releases' arrays)."
    )

    @field_validator("kv_events_config")
    @classmethod
    def _kv_events_config(cls, value: str | None) -> str | None:
        if value:
            kv_events_endpoints(value)  # raises ValueError with the reason
        return value or None

    def kv_events(self) -> KvEventsConfig | None:
        return kv_events_endpoints(self.kv_events_config) if self.kv_events_config else None

    @field_validator("advertise_url")
    @classmethod
    def _advertise_url(cls, url: str | None) -> str | None:
        if url and not url.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return url or None

    def capacity_tokens(self) -> int:
        return self.kv_blocks * self.block_size

    def effective_max_model_len(self) -> int:
        """vLLM refuses to start when max_model_len exceeds the KV cache; the sim caps it."""
        return min(self.max_model_len, self.capacity_tokens())


@dataclass(frozen=True, slots=True)
class KvEventsConfig:
    endpoint: str
    replay_endpoint: str | None
    topic: str


def kv_events_endpoints(config: str) -> KvEventsConfig | None:
    """The publisher settings of a --kv-events-config JSON; None when events are off."""
    try:
        data = json.loads(config)
    except ValueError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError("must be a JSON object")
    if not data.get("enable_kv_cache_events") or data.get("publisher", "zmq") != "zmq":
        return None
    endpoint = data.get("endpoint", "tcp://*:5557")
    replay = data.get("replay_endpoint")
    topic = data.get("topic", "")
    if not isinstance(endpoint, str) or not isinstance(topic, str) or not (
            replay is None or isinstance(replay, str)):
        raise ValueError("endpoint, replay_endpoint and topic must be strings")
    return KvEventsConfig(endpoint, replay, topic)


FAULT_FIELDS: tuple[str, ...] = tuple(
    name for name in SimSettings.model_fields if name.startswith("fault_")
)
