"""Router settings: every option once, with its flag, environment variable and TOML key
derived from the field name (see settings_loader)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .engine_address import url_problem
from .fairness.queue import DEFAULT_CLASSES
from .fairness.tenants import (
    Tenant,
    TenantKey,
    TenantLimits,
    TenantTable,
    check_tenant_name,
    check_unique,
    parse_api_key,
    valid_class_name,
)
from .shared.registry_url import check_redis_url
from .shared.settings_loader import CsvList
from .workers.slot import auto_workers

ENV_PREFIX = "DEEPINFER_"

PolicyName = Literal["kv-aware", "session", "least-conn", "round-robin"]


class TenantSettings(BaseModel):
    """One `[tenants.NAME]` table of the TOML file."""

    model_config = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True,
                              serialize_by_alias=True)

    keys: list[str] = Field(default_factory=list, description="API keys naming this tenant.")
    weight: float = Field(1.0, gt=0, le=1e6, description="Share of a saturated fleet.")
    class_: str | None = Field(None, alias="class", description="Default priority class.")
    max_concurrency: int | None = Field(None, ge=1)
    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1)

    @field_validator("keys")
    @classmethod
    def _keys(cls, keys: list[str]) -> list[str]:
        if any(not k.strip() for k in keys):
            raise ValueError("an empty key is refused")
        return keys


_TENANTS_EXAMPLE = """\
# (TOML tables go after every top-level key of the file)
[tenants.chat]            # a tenant: the name of its API keys
keys = ["sk-chat-1"]      # requests with these keys are the tenant's
class = "interactive"     # its default class (X-Priority may lower it per request)
weight = 2                # its share of a saturated fleet against others of its class
max_concurrency = 64      # budgets (429 + Retry-After + x-ratelimit-* beyond them)
requests_per_minute = 600
tokens_per_minute = 400000
[tenants.etl]
keys = ["sk-etl-1"]
class = "batch"
"""


class RouterSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    # --- serving -------------------------------------------------------------------
    host: str = Field("0.0.0.0", description="Address to listen on.")
    port: int = Field(8080, ge=0, le=65535, description="Port to listen on.")
    workers: str = Field(
        "1", pattern=r"^(auto|[1-9][0-9]{0,2})$",
        description="Router processes serving the port (`auto`: one per usable core, at "
        "most 16). "
        "They share placements, admin writes and /metrics; --max-inflight, "
        "--max-inflight-per-engine and --max-queue split between them.",
    )
    engine: CsvList = Field(
        default_factory=list,
        description="Static engine base URL (with or without /v1); repeatable. The models "
        "served are read from URL/v1/models.",
    )
    redis_url: str | None = Field(
        None,
        description="Shared Redis registry (redis://, rediss:// with TLS, user:password@ for "
        "AUTH). Without it the router keeps an embedded in-memory registry.",
    )
    registry_namespace: str = Field(
        "deepinfer",
        min_length=1,
        description="Key prefix in Redis, so that several fleets can share one Redis.",
    )
    share_hints: bool = Field(
        True,
        description="With --redis-url: share routing placements (prefix chains, session "
        "bindings) with the other routers through Redis, so that all routers route alike.",
    )
    kv_events: Literal["auto", "off"] = Field(
        "auto",
        description="Subscribe to the KV cache event feed of every engine that advertises "
        "one (deepinfer-engine launch does), keeping an index of what each engine really "
        "caches; /ready shows each feed's state.",
    )
    tokenize: Literal["auto", "off"] = Field(
        "auto",
        description="Tokenize chat and text prompts in the router for models whose engines "
        "publish KV events, so routing uses what they really cache (the precise index) for "
        "every prompt, not only for prompts given as token ids. The tokenizer comes from "
        "--tokenizer or the engine record, and is used only once an engine's /tokenize "
        "agrees with it; /ready shows each model's state.",
    )
    tokenizer: CsvList = Field(
        default_factory=list,
        description="MODEL=DIR: the tokenizer directory (tokenizer.json, tokenizer_config.json "
        "or chat_template.jinja) of a served model; repeatable. Without it the directory an "
        "engine record names is used when it exists on this host.",
    )
    decision_log_size: int = Field(
        1024, ge=0, le=1_000_000,
        description="Recent routing decisions kept, explained, for GET "
        "/admin/decisions/{request_id} and graded against the engine's reported cached "
        "tokens (deepinfer_cache_prediction_error_tokens, deepinfer_misroutes_total); 0: "
        "off.",
    )
    engine_ttl_s: float = Field(
        15.0, gt=0, description="Seconds an engine registered through the admin API stays "
        "without a heartbeat before it is dropped."
    )
    sim_engines: int = Field(
        0, ge=0, le=64, description="Demo: start N simulated engines in-process and route to them."
    )
    sim_model: str = Field("sim-model", description="Model name served by --sim-engines.")
    sim_kv_blocks: int = Field(
        2048, ge=16, description="KV cache blocks of each --sim-engines engine."
    )
    sim_speed: float = Field(
        1.0, gt=0, description="Clock speed-up of --sim-engines engines (2 = twice as fast)."
    )

    # --- routing -------------------------------------------------------------------
    policy: PolicyName = Field("kv-aware", description="Routing policy.")
    session_header: str = Field(
        "X-Session-ID",
        description="Request header carrying the session key (the body's `user` field is "
        "used when the header is absent).",
    )
    chars_per_token: float = Field(
        4.0, gt=0, description="Characters per token, to turn engine token capacities into "
        "prompt characters."
    )
    prefix_chunk_chars: int = Field(
        256, ge=8, le=8192, description="Characters per hashed prompt chunk (the granularity of "
        "prefix matching; smaller costs more hashing time and index memory per request)."
    )
    prefix_max_chars: int = Field(
        65536, ge=0, description="Cap on the prompt characters hashed per request (0: no cap)."
    )
    balance_factor: float = Field(
        1.25, ge=1.0, description="Bounded-load factor c: an engine takes a request only while "
        "load+1 <= ceil(c*(total load+1)/candidates)."
    )
    session_ttl_s: float = Field(
        1800.0, gt=0, description="Seconds a session binding lives after its last request."
    )
    max_sessions: int = Field(
        200_000, ge=1, description="Bound on remembered session bindings (oldest dropped first)."
    )
    default_engine_kv_tokens: int = Field(
        100_000, ge=1, description="KV capacity in tokens assumed for an engine that reports none."
    )
    balance_slack: int = Field(
        2, ge=0, le=1024, description="Requests an engine may take beyond the bounded-load "
        "limit (0: KubeAI's guard exactly; more keeps affinity longer at low load, where one "
        "more request in a batch costs far less than recomputing a prefix elsewhere)."
    )
    load_cost_chars: float = Field(
        4096.0, ge=0, description="kv-aware scoring: cached prefix characters that one request "
        "of load is worth (score = matched chars - this x load cost)."
    )
    running_load_weight: float = Field(
        0.5, ge=0, description="kv-aware scoring: load cost of one running request reported by "
        "the engine beyond this router's in-flight count (other routers' requests)."
    )
    kv_usage_load_weight: float = Field(
        1.0, ge=0, description="kv-aware scoring: load cost added at 100% vllm:kv_cache_usage_perc."
    )
    placement_window: float = Field(
        0.5, ge=0, description="kv-aware: a prompt nobody holds goes to an engine within this "
        "load cost of the least loaded, chosen by rendezvous hash of its first chunk."
    )
    prefill_load_chars: float = Field(
        4096.0, ge=0, description="kv-aware load cost: uncached prompt characters still to be "
        "prefilled by an engine (prompt minus the prefix expected cached there, summed over its "
        "requests from this router until their first streamed token, or their end) that count "
        "as one request of load (0: count requests only)."
    )

    # --- engine observation ----------------------------------------------------------
    scrape_interval_s: float = Field(
        1.0, gt=0, description="Seconds between scrapes of each engine's /metrics."
    )
    scrape_timeout_s: float = Field(0.8, gt=0, description="Timeout of one /metrics scrape.")
    scrape_stale_s: float = Field(
        5.0, gt=0, description="Scraped load older than this is ignored (marked stale)."
    )
    health_interval_s: float = Field(
        5.0, gt=0, description="Seconds between active /health checks of each engine."
    )
    health_timeout_s: float = Field(2.0, gt=0, description="Timeout of one /health check.")

    # --- reliability -----------------------------------------------------------------
    connect_timeout_s: float = Field(5.0, gt=0, description="Timeout to connect to an engine.")
    first_byte_timeout_s: float = Field(
        300.0, gt=0, description="Timeout until the engine's response headers arrive."
    )
    stream_idle_timeout_s: float = Field(
        120.0, gt=0, description="Longest silence between two chunks of an engine's response."
    )
    request_timeout_s: float = Field(
        1800.0, gt=0, description="Total time allowed for one request."
    )
    max_retries: int = Field(
        2, ge=0, le=10, description="Retries on another engine for failures before the first "
        "byte reached the client (connect errors and timeouts, resets, any 5xx but 501)."
    )
    retry_backoff_s: float = Field(
        0.02, ge=0, description="Base of the jittered exponential backoff between retries."
    )
    eject_after_failures: int = Field(
        3, ge=1, description="Consecutive failures that take an engine out of routing."
    )
    eject_cooldown_s: float = Field(
        5.0, gt=0, description="Seconds an ejected engine waits before a half-open probe."
    )
    max_inflight: int = Field(
        4096, ge=1, description="Router-wide limit on requests being proxied at once."
    )
    max_inflight_per_engine: int = Field(
        512, ge=1, description="Limit on requests in flight to one engine."
    )
    max_queue: int = Field(
        1024, ge=0, description="Requests allowed to wait for a free slot; beyond it 429."
    )
    queue_timeout_s: float = Field(
        10.0, ge=0, description="Longest wait for a free slot before 429."
    )
    shutdown_grace_s: float = Field(
        30.0, ge=0, description="On SIGTERM, time given to in-flight requests to finish."
    )

    # --- security --------------------------------------------------------------------
    api_key: CsvList = Field(
        default_factory=list,
        description="Accepted client API key (Authorization: Bearer) as NAME:KEY, NAME being "
        "the tenant (1-64 of A-Z a-z 0-9 _ . -), or a plain KEY of tenant `default` (a key "
        "containing ':' needs a name); repeatable. None: "
        "open. An empty key is refused at start-up.",
    )
    tenant_header: str | None = Field(
        None, description="With API keys off: the request header that names the tenant "
        "(trusted: set it only behind a proxy that sets the header). Else tenant `default`.",
    )
    # --- tenants and priorities ------------------------------------------------------
    tenants: dict[str, TenantSettings] = Field(
        default_factory=dict,
        description="Tenants, in the TOML file as `[tenants.NAME]` tables (keys, weight, "
        "class, max_concurrency, requests_per_minute, tokens_per_minute) or as JSON in "
        "DEEPINFER_TENANTS; no flag. Their keys add to --api-key's. `[tenants.default]` "
        "sets the tenant of plain keys (and of every request when keys are off).",
        json_schema_extra={"toml_example": _TENANTS_EXAMPLE},
    )
    priority_classes: CsvList = Field(
        default_factory=lambda: list(DEFAULT_CLASSES),
        description="Priority classes, highest first; a waiting request of a lower class "
        "is served after higher ones, gaining one class per --queue-timeout-s / (2 x "
        "classes) of waiting (so none is starved).",
    )
    default_class: str = Field(
        "standard", description="Class of a tenant that names none.")
    queue_order: Literal["fair", "round-robin", "fifo"] = Field(
        "fair", description="Order of requests waiting for a router slot (--max-inflight): "
        "fair (classes by priority with aging, then weighted fair shares across tenants "
        "charged the tokens each request costs the fleet), round-robin (tenants in turn, "
        "classes and cost ignored) or fifo.",
    )
    class_reserve: float = Field(
        0.0, ge=0, le=0.5, description="Share of --max-inflight that each class leaves to "
        "the classes above it: the requests of the second class and below hold at most "
        "1 - this share of the slots, of the third and below 1 - twice it, and so on (the "
        "top class may take every slot), so that a request of a higher class finds a slot "
        "at once instead of waiting for one to free. Acts with --queue-order fair. 0: every "
        "class may take every slot.",
    )
    engine_priority: Literal["labelled", "all", "off"] = Field(
        "labelled", description="Pass a request's class to the engine as vLLM's `priority` "
        "(the class's place in --priority-classes: 0 for the highest), so the engine's own "
        "queue honours it too: to engines registered with the label "
        "scheduling-policy=priority (`deepinfer-engine launch --scheduling-policy priority` "
        "sets it), to all (every engine runs vLLM with --scheduling-policy priority; vLLM "
        "refuses a priority otherwise), or off. A client's own `priority` is overridden.",
    )
    output_token_cost: float = Field(
        1.0, ge=0, le=1000, description="What an output token costs in the fair queue, "
        "against an uncached prompt token.",
    )
    expected_output_tokens: int = Field(
        256, ge=1, description="Output tokens assumed for a request that sets no max_tokens "
        "(its fair-queue charge and token budget, corrected by the answer's usage).",
    )
    admin_key: str | None = Field(
        None, description="Key for /admin routes. Without it they answer loopback clients "
        "(with a loopback Host) only."
    )
    engine_api_key: str | None = Field(
        None, description="Authorization bearer sent to engines (the client's key is stripped)."
    )
    allow_private_engine_urls: bool = Field(
        False, description="Accept link-local / cloud-metadata engine addresses (refused "
        "otherwise, from every source and at every connection)."
    )
    max_body_mb: float = Field(32.0, gt=0, description="Largest request body, in MiB.")
    max_json_items: int = Field(
        500_000, ge=1, description="Largest number of values in a JSON request body (commas "
        "and opening brackets outside strings), counted before parsing; more is refused "
        "with 400. A 128k-token prompt as token ids is 128k."
    )
    upstream_keepalive_s: float = Field(
        4.0, gt=0, description="Seconds an idle connection to an engine is kept for reuse. "
        "Keep it below the engines' own keep-alive (vLLM's server closes idle connections "
        "after 5 s)."
    )
    loop_lag_interval_s: float = Field(
        0.1, gt=0, description="Period of the event-loop lag probe behind "
        "deepinfer_event_loop_lag_seconds (how late a timer of this period fires)."
    )

    # --- logging ---------------------------------------------------------------------
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level."
    )
    log_format: Literal["text", "json"] = Field("text", description="Log line format.")

    @field_validator("engine")
    @classmethod
    def _engine_urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"engine URL must start with http:// or https://: {url!r}")
        return urls

    @field_validator("tokenizer")
    @classmethod
    def _tokenizer_dirs(cls, items: list[str]) -> list[str]:
        for item in items:
            model, _, path = item.partition("=")
            if not model or not path:
                raise ValueError(f"--tokenizer must be MODEL=DIR: {item!r}")
        return items

    def tokenizer_dirs(self) -> dict[str, str]:
        return dict(item.split("=", 1) for item in self.tokenizer)

    @field_validator("api_key", "admin_key", "engine_api_key", mode="before")
    @classmethod
    def _no_empty_key(cls, value: object, info: ValidationInfo) -> object:
        # Runs before the comma split, which would drop empty parts: `--api-key ''`,
        # `DEEPINFER_API_KEY=` or `api_key = [""]` (an unset variable, usually) must not
        # quietly mean "no key" or a key that an empty Authorization matches.
        parts: object = value
        if isinstance(value, str):  # a list's parts (api_key) come comma-separated
            parts = value.split(",") if info.field_name == "api_key" else [value]
        if isinstance(parts, list | tuple) and any(
            not isinstance(p, str) or not p.strip() for p in parts
        ):
            raise ValueError(
                "an empty key is refused (an unset variable?); leave the option out instead"
            )
        return value

    @field_validator("api_key")
    @classmethod
    def _tenant_keys(cls, keys: list[str]) -> list[str]:
        # raises with what is wrong (never the key itself)
        check_unique([parse_api_key(spec) for spec in keys])
        return keys

    def tenant_keys(self) -> list[TenantKey]:
        """--api-key's keys, then the keys of the `[tenants.NAME]` tables."""
        keys = [parse_api_key(spec) for spec in self.api_key]
        keys += [TenantKey(name, key) for name, t in self.tenants.items() for key in t.keys]
        return keys

    def tenant_table(self) -> TenantTable:
        return TenantTable(
            [Tenant(name, t.weight, t.class_,
                    TenantLimits(t.max_concurrency, t.requests_per_minute, t.tokens_per_minute))
             for name, t in self.tenants.items()],
            self.tenant_keys(), self.priority_classes, self.default_class)

    @model_validator(mode="after")
    def _tenants(self) -> RouterSettings:
        for name in self.tenants:
            check_tenant_name(name)
        if len(set(self.priority_classes)) != len(self.priority_classes) or not all(
                valid_class_name(c) for c in self.priority_classes):
            raise ValueError("--priority-classes: distinct names of 1-32 of a-z 0-9 _ - expected")
        check_unique(self.tenant_keys())  # raises with what is wrong (never the key)
        self.tenant_table()  # classes known
        return self

    @model_validator(mode="after")
    def _engine_addresses(self) -> RouterSettings:
        # The same address checks as every other source (engine_address.py), told at
        # start-up rather than as a log line about an engine left out.
        for url in self.engine:
            problem = url_problem(url, self.allow_private_engine_urls)
            if problem is not None:
                raise ValueError(f"--engine {url}: {problem.message}")
        return self

    def worker_count(self) -> int:
        return auto_workers() if self.workers == "auto" else int(self.workers)

    @model_validator(mode="after")
    def _workers_without_sims(self) -> RouterSettings:
        if self.sim_engines and self.worker_count() > 1:
            # each worker would start engines of its own, and route to its own only
            raise ValueError("--sim-engines runs in one router process: leave --workers at 1")
        return self

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, url: str | None) -> str | None:
        return check_redis_url(url) if url else None
