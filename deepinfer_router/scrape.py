"""Polls each engine's `/metrics` (concurrently, with a timeout) for the load figures
routing uses. Parsing goes through prometheus_client's own text parser: once a second
per engine is far off the hot path, so the well-kept library wins over a faster
hand-written parser."""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from .fleet import ScrapedLoad
from .periodic import EnginePoller

log = logging.getLogger("deepinfer.scrape")

# Current vLLM names first, older names as fallbacks.
_KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
_PREFIX_QUERIES = ("vllm:prefix_cache_queries", "vllm:gpu_prefix_cache_queries")
_PREFIX_HITS = ("vllm:prefix_cache_hits", "vllm:gpu_prefix_cache_hits")


def parse_engine_metrics(text: str, at: float) -> ScrapedLoad:
    """Load figures from a vLLM `/metrics` page, summed over label sets (one engine may
    serve several models or data-parallel ranks)."""
    sums: dict[str, float] = {}
    load = ScrapedLoad(at=at)
    for family in text_string_to_metric_families(text):
        name = family.name
        if name == "vllm:cache_config_info":
            for sample in family.samples:
                blocks = sample.labels.get("num_gpu_blocks")
                size = sample.labels.get("block_size")
                if blocks and blocks.isdigit():
                    load.num_gpu_blocks = int(blocks)
                if size and size.isdigit():
                    load.block_size = int(size)
            continue
        for sample in family.samples:
            # Counters: the parser names the family without `_total`; use the samples.
            if sample.name.endswith(("_created", "_bucket", "_sum", "_count")):
                continue
            sums[name] = sums.get(name, 0.0) + sample.value
    load.waiting = sums.get("vllm:num_requests_waiting", 0.0)
    load.running = sums.get("vllm:num_requests_running", 0.0)
    load.kv_usage = _first(sums, _KV_USAGE) or 0.0
    load.prefix_queries = _first(sums, _PREFIX_QUERIES)
    load.prefix_hits = _first(sums, _PREFIX_HITS)
    return load


def _first(values: dict[str, float], names: tuple[str, ...]) -> float | None:
    for name in names:
        if name in values:
            return values[name]
    return None


class Scraper(EnginePoller):
    kind = "engine metrics scrape"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._failing: set[str] = set()  # engines whose failure was logged already

    async def poll(self, engine_id: str, url: str) -> None:
        before = self._fleet.engines.get(engine_id)
        ours_before = before.inflight if before is not None else 0
        try:
            async with self._session.get(
                f"{url}/metrics", timeout=self._timeout, headers=self._headers,
                allow_redirects=False,  # engine traffic never follows redirects
            ) as resp:
                if resp.status != 200:
                    raise ValueError(f"/metrics answered {resp.status}")
                text = await resp.text()
            load = parse_engine_metrics(text, self._clock())
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            if engine_id not in self._failing:  # log once per outage
                log.info("scrape of %s failed: %s", url, exc or type(exc).__name__)
                self._failing.add(engine_id)
            return
        self._failing.discard(engine_id)
        state = self._fleet.engines.get(engine_id)
        if state is not None:
            # The engine counted ours somewhere between the two readings; the larger one
            # errs towards less foreign load, which keeps conversations where they are.
            load.ours_at_scrape = max(ours_before, state.inflight)
            load.inflight_at_scrape = load.ours_at_scrape + state.sibling_inflight
            state.load = load
