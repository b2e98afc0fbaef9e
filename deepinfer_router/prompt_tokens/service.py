"""Which models the router tokenizes itself, with which tokenizer, and whether it agrees
with the engines'.

Only models with at least one engine whose KV event feed is live need token ids (the
precise index is keyed by them); for each, a tokenizer directory is taken from
`--tokenizer MODEL=DIR`, else from the engine record's `tokenizer` (a directory
`deepinfer-engine launch` names when it serves a local model directory; used only where
it exists on this host, e.g. one machine or a shared filesystem). It is loaded off the
event loop and checked against every engine instance with a live feed, by the engine's
own `POST /tokenize` on a probe chat and a probe text: the router's ids are looked up
only in the indexes of the instances that gave identical ids (`agreeing`; an engine
restarted with another tokenizer is a new instance, checked again). A model without a
tokenizer, or an engine whose check failed, keeps the approximate index (retried every
`retry_s`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import aiohttp

from ..periodic import Periodic
from ..shared.engine_record import EngineRecord
from ..shared.prompt_tokenizer import (
    PromptTokenizer,
    RenderedPrompt,
    TokenizerUnavailable,
    probe_conversation,
    probe_text,
)
from .warmer import PieceWarmer

log = logging.getLogger("deepinfer.prompt_tokens")
_CONCURRENT_CHECKS = 8  # engines probed at once (two small /tokenize calls each)


class PromptTokenizers(Periodic):
    """A service (start/close): `sync` every `interval_s`."""

    def __init__(
        self,
        records: Callable[[], Iterable[EngineRecord]],
        precise: Callable[[str], bool],
        client: Callable[[], aiohttp.ClientSession],
        *,
        configured: Mapping[str, str] | None = None,
        from_engines: bool = True,
        engine_headers: Mapping[str, str] | None = None,
        interval_s: float = 2.0,
        retry_s: float = 60.0,
        probe_timeout_s: float = 10.0,
    ) -> None:
        super().__init__(interval_s, "prompt-tokenizers")
        self._records = records
        self._precise = precise
        self._client = client
        self._configured = dict(configured or {})
        self._from_engines = from_engines
        self._headers = dict(engine_headers or {})
        self._retry_s = retry_s
        self._probe_timeout = probe_timeout_s
        self.ready: dict[str, PromptTokenizer] = {}  # the hot path reads this ...
        # ... and this: model -> engine id -> the instance checked to tokenize alike
        self.agreeing: dict[str, dict[str, str]] = {}
        self._states: dict[str, str] = {}
        self._retry_at: dict[str, float] = {}  # per model (loading)
        # per (model, engine id, instance) checked and found to disagree: when to retry
        self._check_at: dict[tuple[str, str, str], float] = {}
        self._disagreeing: dict[tuple[str, str], str] = {}  # (model, engine) -> why
        self.warmer = PieceWarmer()  # what a head-first request left unencoded

    def get(self, model: str) -> PromptTokenizer | None:
        return self.ready.get(model)

    def prompt_ids(self, model: str, body: Mapping[str, Any]) -> list[int] | None:
        tok = self.ready.get(model)
        return tok.prompt_ids(body) if tok is not None else None

    def render(self, model: str, body: Mapping[str, Any]
               ) -> tuple[PromptTokenizer, RenderedPrompt] | None:
        """The prompt cut into pieces to encode (see PromptTokenizer.render), with the
        tokenizer that encodes them; None where the router cannot tokenize it."""
        tok = self.ready.get(model)
        if tok is None:
            return None
        rendered = tok.render(body)
        return (tok, rendered) if rendered is not None else None

    def states(self) -> dict[str, str]:
        """Per model that needs one: verified, loading, or why not."""
        return dict(sorted(self._states.items()))

    async def sync(self) -> None:
        now = time.monotonic()
        wanted: dict[str, list[EngineRecord]] = {}  # engines with a live feed, per model
        publishing: dict[str, int] = {}  # engines that publish at all, per model
        for record in self._records():
            if record.kv_events is None:
                continue
            live = self._precise(record.id)
            for model in record.models:
                publishing[model] = publishing.get(model, 0) + 1
                if live:
                    wanted.setdefault(model, []).append(record)
        for model in list(self.ready):
            if model not in wanted:  # no engine publishes any more: nothing to look up
                del self.ready[model]
                self._states.pop(model, None)
        current = {(model, r.id, r.instance) for model, records in wanted.items()
                   for r in records}
        for model, engines in list(self.agreeing.items()):
            for engine_id, instance in list(engines.items()):
                if (model, engine_id, instance) not in current:  # gone, or restarted
                    del engines[engine_id]
            if not engines:
                del self.agreeing[model]
        for stale in [k for k in self._check_at if k not in current]:
            del self._check_at[stale]
        engines_now = {(model, engine_id) for model, engine_id, _ in current}
        for gone in [k for k in self._disagreeing if k not in engines_now]:
            del self._disagreeing[gone]
        for model in [m for m in self._retry_at if m not in wanted]:
            del self._retry_at[model]
        for model, records in wanted.items():
            if model not in self.ready:
                if now < self._retry_at.get(model, 0.0):
                    continue
                self._retry_at[model] = now + self._retry_s
                await self._resolve(model, records)
            tok = self.ready.get(model)
            if tok is None:
                continue
            agreeing = self.agreeing.get(model, {})
            unchecked = [r for r in records if agreeing.get(r.id) != r.instance
                         and now >= self._check_at.get((model, r.id, r.instance), 0.0)]
            await self._check_all(model, tok, unchecked)
            self._states[model] = self._model_state(model, records, publishing[model])

    async def _check_all(self, model: str, tok: PromptTokenizer,
                         records: list[EngineRecord]) -> int:
        """Check `records` (a few at a time); how many agree."""
        retry_at = time.monotonic() + self._retry_s
        gate = asyncio.Semaphore(_CONCURRENT_CHECKS)

        async def one(record: EngineRecord) -> bool:
            self._check_at[(model, record.id, record.instance)] = retry_at
            async with gate:
                return await self._check(model, tok, record)

        return sum(await asyncio.gather(*(one(r) for r in records)))

    def _model_state(self, model: str, records: list[EngineRecord], publishing: int
                     ) -> str:
        """verified: every engine that publishes KV events for the model was checked to
        tokenize alike (one whose feed is not live yet is not checked yet)."""
        agreeing = self.agreeing.get(model, {})
        agreed = sum(agreeing.get(r.id) == r.instance for r in records)
        if agreed >= publishing:
            return "verified"
        why = next((self._disagreeing[(model, r.id)] for r in records
                    if (model, r.id) in self._disagreeing),
                   "the others' feeds are not live yet")
        return f"verified on {agreed} of {publishing} engines; {why}"[:300]

    async def _check(self, model: str, tok: PromptTokenizer, record: EngineRecord) -> bool:
        problem = await self._verify(model, tok, record)
        if problem is None:
            self.agreeing.setdefault(model, {})[record.id] = record.instance
            self._disagreeing.pop((model, record.id), None)
            return True
        engines = self.agreeing.get(model, {})
        if engines.get(record.id) == record.instance:  # it agreed before: no longer
            del engines[record.id]
        self._disagreeing[(model, record.id)] = \
            f"disagrees with engine {record.id}: {problem}"
        log.warning("model %s: the router's tokenizer disagrees with engine %s (%s); its "
                    "prompts keep the approximate index there", model, record.id, problem)
        return False

    async def _resolve(self, model: str, records: list[EngineRecord]) -> None:
        """Load the model's tokenizer; it is used once some engine agrees with it."""
        path = self._configured.get(model)
        named = next((r.tokenizer for r in records if r.tokenizer), None)
        if path is None and self._from_engines and named:
            path = named
        if path is None or not await asyncio.to_thread(Path(path).is_dir):
            self._states[model] = ("no tokenizer (--tokenizer MODEL=DIR, or an engine "
                                   "record naming a directory on this host)")
            return
        self._states[model] = "loading"
        try:
            tok = await asyncio.to_thread(PromptTokenizer.from_dir, path)
        except TokenizerUnavailable as exc:
            self._states[model] = f"unusable tokenizer: {exc}"[:300]
            log.warning("model %s: tokenizer at %s unusable: %s", model, path, exc)
            return
        agreed = await self._check_all(model, tok, records)
        if not agreed:
            self._states[model] = self._disagreeing[(model, records[0].id)][:300]
            return
        self.ready[model] = tok
        self._states[model] = "verified"
        log.info("model %s: prompts tokenized in the router (%s), checked against %d of %d "
                 "engines", model, path, agreed, len(records))

    async def _verify(self, model: str, tok: PromptTokenizer, record: EngineRecord
                      ) -> str | None:
        """None when the engine's /tokenize gives the same ids for the probes."""
        checks: list[tuple[str, dict[str, Any], list[int] | None]] = [
            ("text", {"model": model, "prompt": probe_text()}, tok.text_ids(probe_text()))]
        if tok.has_chat_template:
            chat = {"model": model, "messages": probe_conversation(),
                    "add_generation_prompt": True}
            checks.append(("chat", chat, tok.chat_ids(chat)))
        for kind, body, mine in checks:
            try:
                async with asyncio.timeout(self._probe_timeout):
                    async with self._client().post(record.url + "/tokenize", json=body,
                                                   headers=self._headers) as resp:
                        if resp.status != 200:
                            return f"{kind} probe: /tokenize answered {resp.status}"
                        answer = await resp.json(content_type=None)
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                return f"{kind} probe: {type(exc).__name__}: {exc}"[:200]
            theirs = answer.get("tokens") if isinstance(answer, dict) else None
            if theirs != mine:
                return f"{kind} probe ids differ (router {len(mine or [])}, engine " \
                       f"{len(theirs) if isinstance(theirs, list) else '?'})"
        return None

    async def run_once(self) -> None:
        await self.sync()

    async def close(self) -> None:
        await super().close()
        await self.warmer.close()
        self.ready.clear()
        self.agreeing.clear()
