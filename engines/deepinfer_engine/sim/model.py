"""The simulated engine: vLLM V1's scheduler over a paged, prefix-cached KV cache.

Pure code: time is passed in, nothing here reads a clock or touches a socket, so the
same engine runs behind the HTTP server, in unit tests and in offline simulations.

One engine step, as in vLLM V1 (`Scheduler.schedule`), with a token budget of
`max_num_batched_tokens` (chunked prefill):
1. running requests first, in admission order: a decoding request takes one token, a
   request still in prefill takes as much of its prompt as the budget allows; when a
   request cannot get a block, the most recently admitted running request is preempted
   (its blocks freed, its computed tokens forgotten, back to the front of the queue), as
   vLLM does in recompute mode;
2. then waiting requests, first come first served (with `scheduling_policy="priority"`:
   by the request's `priority`, lower first, then arrival; and a block shortage preempts
   the running request of the lowest priority, as vLLM's priority policy), while the
   budget lasts and fewer than `max_num_seqs` run: each reuses its longest cached prefix
   (at most all its tokens but one: the last token must be computed to produce logits)
   and gets blocks for the chunk it computes now; a request that cannot get blocks
   waits, and so does everyone behind it (no skipping ahead, like vLLM's policies).
The step lasts `CostModel.step_time`; when it ends (`finish_step`), computed full blocks
become cached, each request whose tokens are all computed samples one new token, and
finished requests free their blocks.
"""

from __future__ import annotations

import bisect
import math
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Literal

from .cost import CostModel
from .kv_cache import ROOT_HASH, Block, KVCache, block_hashes, hash_block
from .tokenizer import filler_offset, filler_token, token_id

FinishReason = Literal["length", "stop", "abort"]


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Request:
    """One sequence: its tokens (prompt, then output), blocks and timestamps."""

    __slots__ = (
        "all_tokens",
        "arrival_time",
        "block_hashes",
        "blocks",
        "finish_reason",
        "finish_time",
        "first_token_time",
        "id",
        "last_token_time",
        "max_tokens",
        "num_cached_blocks",
        "num_cached_tokens",
        "num_computed",
        "num_output",
        "num_preemptions",
        "num_prompt",
        "on_limit",
        "output_offset",
        "priority",
        "scheduled_time",
        "status",
        "user_data",
    )

    def __init__(
        self,
        request_id: str,
        prompt_tokens: Sequence[str],
        max_tokens: int,
        block_size: int,
        on_limit: FinishReason = "length",
        arrival_time: float = 0.0,
        priority: int = 0,
    ) -> None:
        self.id = request_id
        self.priority = priority
        self.all_tokens: list[str] = list(prompt_tokens)
        self.num_prompt = len(self.all_tokens)
        self.max_tokens = max_tokens
        # finish reason reported when max_tokens is reached: "length" when the client set
        # max_tokens, "stop" when the sim drew the length (it stands for an EOS token)
        self.on_limit: FinishReason = on_limit
        self.block_hashes = block_hashes(self.all_tokens, block_size)
        self.blocks: list[Block] = []
        self.num_computed = 0  # tokens whose KV is in the cache
        self.num_cached_blocks = 0  # blocks of this request registered in the prefix cache
        self.num_cached_tokens = -1  # prefix-cache hit at first admission (-1: not yet)
        self.num_output = 0
        self.num_preemptions = 0
        self.output_offset = filler_offset(self.all_tokens)
        self.status = Status.WAITING
        self.finish_reason: FinishReason | None = None
        self.arrival_time = arrival_time
        self.scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.finish_time: float | None = None
        self.user_data: object = None  # the server's per-request state

    @property
    def num_tokens(self) -> int:
        return len(self.all_tokens)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def output_tokens(self) -> list[str]:
        return self.all_tokens[self.num_prompt :]

    def output_text(self) -> str:
        return "".join(self.all_tokens[self.num_prompt :])

    def __repr__(self) -> str:
        return (
            f"Request({self.id}, {self.status.value}, prompt={self.num_prompt}, "
            f"out={self.num_output}/{self.max_tokens}, computed={self.num_computed})"
        )


@dataclass(slots=True)
class Step:
    """What one engine step computes and how long it takes."""

    start: float
    duration: float
    scheduled: list[tuple[Request, int]] = field(default_factory=list)
    prefill_tokens: int = 0
    decode_seqs: int = 0
    preempted: list[Request] = field(default_factory=list)

    @property
    def end(self) -> float:
        return self.start + self.duration


@dataclass(slots=True)
class EngineStats:
    """Cumulative counters, named after the vLLM metrics they feed."""

    prefix_cache_queries: int = 0  # prompt tokens looked up (vllm:prefix_cache_queries)
    prefix_cache_hits: int = 0  # of which found cached (vllm:prefix_cache_hits)
    prompt_tokens: int = 0  # vllm:prompt_tokens
    generation_tokens: int = 0  # vllm:generation_tokens
    preemptions: int = 0  # vllm:num_preemptions
    steps: int = 0
    finished: dict[str, int] = field(
        default_factory=lambda: {"stop": 0, "length": 0, "abort": 0}
    )


class RequestTooLong(ValueError):
    """Prompt plus output exceed max_model_len (vLLM answers 400)."""


class SimEngine:
    def __init__(
        self,
        *,
        num_blocks: int,
        block_size: int = 16,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 8192,
        max_model_len: int | None = None,
        cost: CostModel | None = None,
        scheduling_policy: Literal["fcfs", "priority"] = "fcfs",
    ) -> None:
        self.kv = KVCache(num_blocks, block_size)
        self.by_priority = scheduling_policy == "priority"
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        capacity = num_blocks * block_size
        self.max_model_len = min(max_model_len or capacity, capacity)
        self.cost = cost or CostModel()
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.stats = EngineStats()

    # --- requests ------------------------------------------------------------------------
    def check_length(self, num_prompt: int, max_tokens: int) -> None:
        if num_prompt + max_tokens > self.max_model_len:
            raise RequestTooLong(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {num_prompt + max_tokens} tokens ({num_prompt} in the messages, "
                f"{max_tokens} in the completion). Please reduce the length of the messages or "
                "completion."
            )

    def new_request(
        self,
        request_id: str,
        prompt_tokens: Sequence[str],
        max_tokens: int,
        now: float,
        on_limit: FinishReason = "length",
        priority: int = 0,
    ) -> Request:
        """Validate and queue a request. Raises RequestTooLong, ValueError."""
        if priority != 0 and not self.by_priority:
            raise ValueError(f"Got priority {priority} but Priority scheduling is not "
                             "enabled.")  # vLLM's words
        if not prompt_tokens:
            raise ValueError("The prompt must contain at least one token.")
        if max_tokens < 1:
            raise ValueError("max_tokens must be at least 1.")
        self.check_length(len(prompt_tokens), max_tokens)
        req = Request(request_id, prompt_tokens, max_tokens, self.block_size, on_limit, now,
                      priority)
        self._enqueue(req)
        return req

    def _enqueue(self, req: Request, front: bool = False) -> None:
        if self.by_priority:  # kept sorted by (priority, arrival)
            key = (req.priority, req.arrival_time)
            at = bisect.bisect_right(self.waiting, key, key=_priority_key)
            self.waiting.insert(at, req)
        elif front:
            self.waiting.appendleft(req)
        else:
            self.waiting.append(req)

    def abort(self, req: Request, now: float) -> None:
        """The client went away: free the sequence and its blocks at once."""
        if req.status is Status.FINISHED:
            return
        if req.status is Status.WAITING:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        else:
            try:
                self.running.remove(req)
            except ValueError:
                pass
        self._finish(req, "abort", now)

    def _finish(self, req: Request, reason: FinishReason, now: float) -> None:
        if req.blocks:
            self.kv.free(req.blocks)
            req.blocks = []
        req.status = Status.FINISHED
        req.finish_reason = reason
        req.finish_time = now
        self.stats.finished[reason] += 1

    # --- views ---------------------------------------------------------------------------
    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def kv_usage(self) -> float:
        return self.kv.usage()

    def cached_prefix_tokens(self, prompt_tokens: Sequence[str]) -> int:
        """Prompt tokens a request with this prompt would find cached if admitted now (the
        same rule as admission: full blocks only, never the last token)."""
        n = len(prompt_tokens)
        if n < 2:
            return 0
        bs = self.block_size
        max_blocks = (n - 1) // bs
        parent = ROOT_HASH
        cached = 0
        for i in range(max_blocks):
            parent = hash_block(parent, prompt_tokens[i * bs : (i + 1) * bs])
            if not self.kv.is_cached(parent):
                break
            cached += 1
        return cached * bs

    # --- scheduling ----------------------------------------------------------------------
    def _blocks_needed(self, req: Request, num_new: int, have: int) -> int:
        return -(-(req.num_computed + num_new) // self.block_size) - have

    def _preempt(self, req: Request, step: Step) -> None:
        """Recompute-mode preemption: free everything, requeue at the front."""
        if req.blocks:
            self.kv.free(req.blocks)
            req.blocks = []
        req.num_computed = 0
        req.num_cached_blocks = 0
        req.num_preemptions += 1
        req.status = Status.WAITING
        self._enqueue(req, front=True)
        self.stats.preemptions += 1
        step.preempted.append(req)

    def _victim(self) -> int:
        """Where in `running` the request to preempt is."""
        running = self.running
        if not self.by_priority:
            return len(running) - 1
        return max(range(len(running)), key=lambda i: _priority_key(running[i]))

    def schedule(self, now: float) -> Step | None:
        """Choose the work of the step starting at `now`; None when there is nothing to do."""
        if not self.running and not self.waiting:
            return None
        kv, bs = self.kv, self.block_size
        budget = self.max_num_batched_tokens
        step = Step(start=now, duration=0.0)
        scheduled = step.scheduled
        prefill_tokens = decode_seqs = decode_context = 0

        # 1. running requests, oldest first
        running = self.running
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            num_new = min(req.num_tokens - req.num_computed, budget)
            need = self._blocks_needed(req, num_new, len(req.blocks))
            while need > kv.num_free:
                # the most recently admitted one (priority: the lowest priority's, even one
                # scheduled already in this step, whose work is then taken back, as vLLM)
                at = self._victim()
                victim = running[at]
                if at < i:
                    n = next(n for r, n in scheduled if r is victim)
                    scheduled.remove((victim, n))
                    budget += n
                    if n == 1 and victim.num_output > 0:
                        decode_seqs -= 1
                        decode_context -= victim.num_computed
                    else:
                        prefill_tokens -= n
                    i -= 1
                running.pop(at)
                self._preempt(victim, step)
                if victim is req:
                    break
            if req.status is not Status.RUNNING:
                if self.by_priority:
                    continue  # it preempted itself; those after it have higher priority
                break  # it preempted itself: everything after it is gone too
            if need > 0:
                req.blocks.extend(kv.allocate(need))
            scheduled.append((req, num_new))
            budget -= num_new
            if num_new == 1 and req.num_output > 0:
                decode_seqs += 1
                decode_context += req.num_computed
            else:
                prefill_tokens += num_new
            i += 1

        # 2. waiting requests, first come first served (none after a preemption, as vLLM)
        waiting = self.waiting
        stats = self.stats
        while waiting and budget > 0 and len(running) < self.max_num_seqs and not step.preempted:
            req = waiting[0]
            hit = kv.match_prefix(req.block_hashes, (req.num_tokens - 1) // bs)
            num_computed = len(hit) * bs
            num_new = min(req.num_tokens - num_computed, budget)
            need = -(-(num_computed + num_new) // bs) - len(hit)
            if not kv.can_allocate(need, hit):
                break  # wait for blocks; nobody overtakes the head of the queue
            kv.touch(hit)
            req.blocks = hit + kv.allocate(need)
            req.num_computed = num_computed
            req.num_cached_blocks = len(hit)
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_computed
            stats.prefix_cache_queries += req.num_tokens
            stats.prefix_cache_hits += num_computed
            waiting.popleft()
            req.status = Status.RUNNING
            if req.scheduled_time is None:
                req.scheduled_time = now
            running.append(req)
            scheduled.append((req, num_new))
            budget -= num_new
            prefill_tokens += num_new

        if not scheduled:
            return None
        step.prefill_tokens = prefill_tokens
        step.decode_seqs = decode_seqs
        step.duration = self.cost.step_time(prefill_tokens, decode_seqs, decode_context)
        return step

    def finish_step(self, step: Step, now: float | None = None) -> list[Request]:
        """Apply a step's results at its end: cache full blocks, sample one token for each
        request that computed all its tokens, finish those at their limit. Returns the
        requests that got a new token (finished ones included)."""
        now = step.end if now is None else now
        kv, bs = self.kv, self.block_size
        stats = self.stats
        stats.steps += 1
        out: list[Request] = []
        finished: list[Request] = []
        for req, num_new in step.scheduled:
            if req.status is not Status.RUNNING:
                continue  # aborted while the step ran
            req.num_computed += num_new
            full = req.num_computed // bs
            if full > req.num_cached_blocks:
                hashes, blocks = req.block_hashes, req.blocks
                events = kv.events is not None
                for j in range(req.num_cached_blocks, full):
                    if events:  # the event names the block's parent and its token ids
                        kv.cache_block(blocks[j], hashes[j], hashes[j - 1] if j else None,
                                       [token_id(t) for t in req.all_tokens[j * bs:(j + 1) * bs]])
                    else:
                        kv.cache_block(blocks[j], hashes[j])
                req.num_cached_blocks = full
            if req.num_computed < req.num_tokens:
                continue  # a prefill chunk: no token yet
            # sample the next token
            token = filler_token(req.output_offset, req.num_output)
            req.all_tokens.append(token)
            req.num_output += 1
            n = len(req.all_tokens)
            if n % bs == 0:
                parent = req.block_hashes[-1] if req.block_hashes else ROOT_HASH
                req.block_hashes.append(hash_block(parent, req.all_tokens[n - bs :]))
            stats.generation_tokens += 1
            if req.first_token_time is None:
                req.first_token_time = now
                stats.prompt_tokens += req.num_prompt
            req.last_token_time = now
            out.append(req)
            if req.num_output >= req.max_tokens:
                finished.append(req)
        if finished:
            done = set(map(id, finished))
            self.running = [r for r in self.running if id(r) not in done]
            for req in finished:
                self._finish(req, req.on_limit, now)
        return out

    # --- offline driving ---------------------------------------------------------------
    def run_until_idle(self, now: float, max_steps: int = 10_000_000) -> float:
        """Run steps back to back until no work is left; returns the time it ends."""
        for _ in range(max_steps):
            step = self.schedule(now)
            if step is None:
                return now
            now = step.end
            self.finish_step(step, now)
        raise RuntimeError("engine did not become idle")


def draw_output_len(
    rng: random.Random, dist: str, mean: float, cap: int
) -> int:
    """An output length for a request without max_tokens (it stands for generating until
    an end-of-sequence token)."""
    if cap < 1:
        return 1
    if dist == "fixed":
        value = mean
    elif dist == "uniform":
        value = rng.uniform(1, 2 * mean - 1)
    elif dist == "exponential":
        value = rng.expovariate(1.0 / mean)
    elif dist == "lognormal":
        sigma = 0.8  # chat answers: median ~0.7 x mean, long tail
        value = rng.lognormvariate(math.log(mean) - sigma * sigma / 2, sigma)
    else:
        raise ValueError(f"unknown output length distribution {dist!r}")
    return max(1, min(cap, round(value)))


def _priority_key(req: Request) -> tuple[int, float]:
    return req.priority, req.arrival_time
