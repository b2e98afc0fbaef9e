"""Finishes, off every request's path, the encoding of prompts whose head alone was
encoded (no engine held it, so the rest did not matter for routing that request).

Such a prompt often comes back: a conversation's next turn, a shared system prompt's or
document's next request. Without this, that next request pays for encoding the whole of
it before it is routed (several milliseconds for 15k characters, measured on
benchmarks/routing.py's shared-prefix workload); with it, its pieces are in the
tokenizer's LRU and the request costs a lookup. One prompt at a time, in one worker
thread (the encoding releases the GIL), with a bound on the characters waiting: past it
an offer is dropped and the next request encodes that prompt itself, as before.
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
        self._waiting: deque[tuple[PromptTokenizer, RenderedPrompt]] = deque()
        self._chars = 0  # uncached characters waiting or being encoded
        self._task: asyncio.Task[None] | None = None
        self.warmed = 0
        self.dropped = 0

    def offer(self, tok: PromptTokenizer, rendered: RenderedPrompt) -> bool:
        """Queue the prompt's pieces for encoding into `tok`'s LRU; False where they
        would not be cached (a prompt encoded whole) or the queue is full."""
        chars = rendered.uncached_chars
        if rendered.whole is not None or chars <= 0:
            return False
        if self._chars + chars > self.max_chars:
            self.dropped += 1
            return False
        self._waiting.append((tok, rendered))
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
            tok, rendered = self._waiting.popleft()
            try:
                await asyncio.to_thread(tok.encode_rendered, rendered)
                self.warmed += 1
            except Exception:  # a hint cache: never let it stop the next ones
                log.warning("encoding a prompt's pieces ahead failed", exc_info=True)
            finally:
                self._chars -= rendered.uncached_chars

    async def close(self) -> None:
        self._waiting.clear()
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._chars = 0
