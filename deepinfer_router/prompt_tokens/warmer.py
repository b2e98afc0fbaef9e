"""Finishes the encoding of prompts whose head alone was encoded before routing (no
engine held it, so the rest did not matter for that request), without the request
waiting for it.

Such a prompt often comes back: a conversation's next turn, a shared system prompt's or
document's next request. Without this, that next request pays for encoding the whole of
it before it is routed (6-9 ms for 15k characters on benchmarks/routing.py's
shared-prefix workload, 2-core VM); with it, its pieces are in the tokenizer's LRU and
the request costs a lookup. The work is started when offered and runs beside the
request (nothing awaits it), one prompt at a time in one worker thread (the encoding
releases the GIL), bounded by the characters waiting: past the bound an offer is dropped
and the next request encodes that prompt itself, as before. The price: every head-only
prompt is encoded in full after all, on the router's cores, and enters the LRU.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from ..shared.prompt_tokenizer import PromptTokenizer, RenderedPrompt

log = logging.getLogger("deepinfer.prompt_tokens")
DEFAULT_MAX_CHARS = 1 << 20  # waiting at most: ~0.25 s of one core's encoding


class PieceWarmer:
    def __init__(self, max_chars: int = DEFAULT_MAX_CHARS) -> None:
        self.max_chars = max_chars
        self._waiting: deque[tuple[PromptTokenizer, list[str], int]] = deque()
        self._chars = 0  # characters waiting or being encoded
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.warmed = 0
        self.dropped = 0

    def offer(self, tok: PromptTokenizer, rendered: RenderedPrompt) -> bool:
        """Queue the prompt's pieces that are not in `tok`'s LRU for encoding into it;
        False where there are none, the queue is full or the warmer is closed. Only
        those pieces are held (not the prompt), so the bound is on memory too."""
        if self._closed:
            return False
        pieces = tok.uncached_pieces(rendered)
        chars = sum(map(len, pieces))
        if not chars:
            return False
        if self._chars + chars > self.max_chars:
            self.dropped += 1
            return False
        self._waiting.append((tok, pieces, chars))
        self._chars += chars
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._drain(), name="prompt-piece-warmer")
        return True

    @property
    def waiting_chars(self) -> int:
        return self._chars

    async def _drain(self) -> None:
        while self._waiting:
            tok, pieces, chars = self._waiting.popleft()
            try:
                await asyncio.to_thread(tok.warm, pieces)
                self.warmed += 1
            except Exception:  # a hint cache: never let it stop the next ones
                log.warning("encoding a prompt's pieces ahead failed", exc_info=True)
            finally:
                self._chars -= chars

    async def close(self) -> None:
        """Drop what waits and stop; a piece being encoded in the worker thread finishes
        there (a thread cannot be interrupted), its result unused."""
        self._closed = True
        while self._waiting:
            self._chars -= self._waiting.popleft()[2]
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
