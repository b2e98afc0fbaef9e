"""Fair admission under overload (issue 19): tenants and priority classes through the real
router, simulated vLLM engines offered ~150% of what they can serve.

Every run starts a fresh fleet (routing.py's `_sims` subprocess, empty KV caches) and a
fresh router subprocess with `--queue-order ORDER`, the scenario's tenants in a TOML
`--config` file (`[tenants.NAME]` with `keys`, `weight`, `class`), `--max-inflight` set
to the fleet's capacity (engines x the engines' --max-num-seqs, so the router queues
exactly when the engines are full), a large `--max-queue` and a long `--queue-timeout-s`
(nothing is refused). `--max-inflight-per-engine` keeps its large default (its waits are
FIFO). A seeded load generator in this process (aiohttp) sends streaming chat completions
with each tenant's API key, measures the time to first token client-side and reads every
answer's usage (`stream_options.include_usage`).

The fleet: 2 engines, the simulator's default cost model (8B model on one H100,
engines/deepinfer_engine/sim/cost.py) and vLLM's 8192-token step budget, but
--max-num-seqs 8 (set through DEEPINFER_ENGINE_MAX_NUM_SEQS) so that overload takes
tens of requests, not hundreds (the reference machine has 2 cores): capacity 16.

Load: a tenant is either backlogged (N clients, each sending its next request as soon
as its last was answered: closed loop) or light (Poisson arrivals: open loop). Prompts
are seeded random text (routing_workloads.Text: one word, one token), unique per request
unless they share a prefix. Each run lasts a fixed model time; the load stops at that
bound (requests still open are cancelled) and everything is measured over the window
after the warm-up.

Time: the engines run `--speed` times faster than the modelled GPU; all times reported
are *model* seconds (wall x speed), as in routing.py. The router's own time is inflated
as much, which makes short TTFTs conservative. (routing.py's "router at 1x" TTFT does not
apply here: it would count the wait in the router's queue, which stands for engine time,
at wall-clock speed.)

Engine work of an answer = prompt_tokens - cached_tokens + completion_tokens (its usage):
what the fair queue charges (uncached prompt + output tokens).

Scenarios and targets (each run under fifo, round-robin, fair and fair+reserve: the
fair order with --class-reserve 0.125, each class leaving 1/8 of the slots per rank to
the classes above it; the targets are the fair orders', and are checked for every order
to show what the order changes):

  A weights   tenants `gold` (weight 2) and `bronze` (weight 1), both class batch, 16
              clients each, unique 1,500-2,500-token prompts, 32 output tokens. Each
              tenant alone fills the fleet (32 on 16 slots), so both stay backlogged
              under every order: at 12 each (150%) `gold` has no request waiting now
              and then when a slot frees, loses that turn, and gets ~64% instead of 67%
              (a load generator artefact, not the queue's). Target: each tenant's share
              of the engine work served in the window within 10% of its weight share
              (|share / weight share - 1| <= 0.1). Reported: Jain's fairness index of
              the weight-normalised shares (1 = exactly as weighted).
  B priority  `flood` (class batch): 24 clients with unique 2,000-4,000-token prompts
              (150% of the slots on its own); `chat-a` and `chat-b` (class
              interactive): 1.5 requests/s each, a 20-80-token question under a shared
              1,000-token system prompt. Targets: interactive TTFT p90 <= 0.1x the batch
              tenant's TTFT p90 in the same run, and <= 0.1x the interactive TTFT p90
              under fifo; engine work per second >= 0.9x fifo's (within 10%; more is no
              miss).
  C caching   `reuse` and `fresh`, equal weights, 12 clients each: `reuse` asks 20-80
              new tokens after a shared 3,000-token document, `fresh` sends unique
              3,020-3,080-token prompts. Target: `reuse` completes more requests in the
              window than `fresh` (its cached prefix is not charged).

TTFT percentiles are over the requests sent in the window; a request with no first
token when the load stops counts at its wait so far (a lower bound; their number is
reported as `censored`). The per-tenant table splits the TTFT: `engine p90` is the
engines' part (their queue and the prefill, as the simulator reports it) and `router
wait` the mean wait for a router slot (the router's deepinfer_tenant_queue_wait_seconds
over the window). Also reported per run: the engines' busy share, their mean running and
waiting requests (waiting there is queueing the router's order does not control) and
the CPU share of the router, fleet and load generator. Seeds are frozen per scenario.

    python benchmarks/fairness.py                              # A, B, C x 4 orders (~9 min)
    python benchmarks/fairness.py --quick                      # shorter runs (~2.5 min)
    python benchmarks/fairness.py --quick --scenarios B --orders fifo,fair
    python benchmarks/fairness.py --quick --scenarios B --engine-priority  # engines by class
    python benchmarks/fairness.py --held-back                  # other seeds, 4 engines x 4
    python benchmarks/fairness.py --src DIR                    # measure another source tree

Writes the JSON to benchmarks/results/fairness.json (--out) and prints the table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from routing import (  # noqa: E402  (benchmarks/ is this script's directory)
    ROOT,
    Fleet,
    Router,
    cpu_seconds,
    parse_metrics,
    pct,
    source_revision,
    strip_src,
    wait_ready,
)
from routing_workloads import MODEL, Text  # noqa: E402

# fair+reserve: the fair order with --class-reserve (slots each class leaves to the
# classes above it; RESERVE unless --class-reserve says otherwise)
ORDERS = ("fifo", "round-robin", "fair", "fair+reserve")
RESERVE = 0.125
DEFAULT_OUT = HERE / "results" / "fairness.json"
HELD_BACK_OUT = HERE / "results" / "fairness_held_back.json"
# --held-back: the same scenarios on a fleet shaped otherwise, with other seeds (frozen
# here, never tuned on): 4 engines x 4 sequences
HELD_BACK_SEED_OFFSET = 7919
HELD_BACK_FLEET = (4, 4)

# --- calibration (recorded in the JSON) ---------------------------------------------------
N_ENGINES = 2
MAX_NUM_SEQS = 8  # per engine: the fleet's capacity is N_ENGINES x this
KV_BLOCKS = 4096  # 65,536 tokens per engine: the running prompts and C's document fit
SPEED = 4.0
HORIZON_S, WARMUP_S = 150.0, 30.0  # model seconds: load stops at the horizon
QUICK_HORIZON_S, QUICK_WARMUP_S = 60.0, 15.0
QUEUE_TIMEOUT_S = 600.0
MAX_QUEUE = 100_000
SAMPLE_EVERY_S = 0.25  # wall seconds between samples of the engines' queues


@dataclass(frozen=True)
class Tenant:
    name: str
    klass: str | None = None  # None: the router's default class (standard)
    weight: float = 1.0
    clients: int = 0  # backlogged: this many closed-loop clients
    rate: float = 0.0  # light: Poisson arrivals per model second
    prompt_tokens: tuple[int, int] = (2000, 4000)  # unique text, drawn uniformly
    shared: str = ""  # a shared prefix (system message) of `shared_tokens`, by name
    shared_tokens: int = 0
    max_tokens: int = 32

    @property
    def key(self) -> str:
        return f"sk-{self.name}"


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    seed: int
    tenants: tuple[Tenant, ...]


SCENARIOS: dict[str, Scenario] = {s.key: s for s in (
    Scenario("A", "A weights 2:1", 1901, (
        Tenant("gold", "batch", 2.0, clients=16, prompt_tokens=(1500, 2500)),
        Tenant("bronze", "batch", 1.0, clients=16, prompt_tokens=(1500, 2500)),
    )),
    Scenario("B", "B priority", 1902, (
        Tenant("flood", "batch", clients=24, prompt_tokens=(2000, 4000)),
        Tenant("chat-a", "interactive", rate=1.5, prompt_tokens=(20, 80), shared="system",
               shared_tokens=1000),
        Tenant("chat-b", "interactive", rate=1.5, prompt_tokens=(20, 80), shared="system",
               shared_tokens=1000),
    )),
    Scenario("C", "C cache-aware charging", 1903, (
        Tenant("reuse", clients=12, prompt_tokens=(20, 80), shared="document",
               shared_tokens=3000),
        Tenant("fresh", clients=12, prompt_tokens=(3020, 3080)),
    )),
)}


# --- the router's tenants ---------------------------------------------------------------
def tenants_toml(sc: Scenario) -> str:
    """The `[tenants.NAME]` tables of the router's --config file."""
    lines: list[str] = []
    for t in sc.tenants:
        lines += [f'[tenants."{t.name}"]', f'keys = ["{t.key}"]', f"weight = {t.weight}"]
        if t.klass is not None:
            lines.append(f'class = "{t.klass}"')
        lines.append("")
    return "\n".join(lines)


def router_args(config: Path, order: str, capacity: int) -> list[str]:
    return ["--config", str(config), "--queue-order", order,
            "--max-inflight", str(capacity), "--max-queue", str(MAX_QUEUE),
            "--queue-timeout-s", str(QUEUE_TIMEOUT_S)]


@contextlib.contextmanager
def engine_env(args: argparse.Namespace) -> Iterator[None]:
    """The fleet subprocess reads --max-num-seqs (and --scheduling-policy) from the
    environment (routing.py's `_sims` sets the rest); only it sees the variables."""
    values = {"DEEPINFER_ENGINE_MAX_NUM_SEQS": str(args.max_num_seqs)}
    if args.engine_priority:
        values["DEEPINFER_ENGINE_SCHEDULING_POLICY"] = "priority"
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# --- the load generator -----------------------------------------------------------------
@dataclass(slots=True)
class Answer:
    tenant: str
    klass: str
    sent: float  # model seconds since the load started
    ttft: float = math.nan  # model seconds; nan: no first token
    engine_ttft: float = math.nan  # of which at the engine (its queue + prefill), model s
    done: float = math.nan  # when the answer ended (model seconds); nan: it did not
    status: int = 0  # HTTP status (0: none)
    prompt: int = 0  # the answer's usage
    cached: int = 0
    completion: int = 0

    @property
    def work(self) -> int:
        return self.prompt - self.cached + self.completion


class Load:
    """Sends the scenario's requests to the router and keeps every answer."""

    def __init__(self, session: Any, url: str, sc: Scenario, speed: float) -> None:
        self.session = session
        self.url = url + "/v1/chat/completions"
        self.sc = sc
        self.speed = speed
        self.text = Text(sc.seed)
        self.shared = {t.shared: self.text.words(random.Random(f"{sc.seed}/{t.shared}"),
                                                 t.shared_tokens)
                       for t in sc.tenants if t.shared}
        self.answers: list[Answer] = []
        self.t0 = 0.0

    def now(self) -> float:
        return (asyncio.get_running_loop().time() - self.t0) * self.speed

    def body(self, t: Tenant, rng: random.Random) -> bytes:
        import orjson

        user = self.text.words(rng, rng.randint(*t.prompt_tokens))
        messages = [{"role": "user", "content": user}]
        if t.shared:
            messages.insert(0, {"role": "system", "content": self.shared[t.shared]})
        return orjson.dumps({"model": MODEL, "messages": messages, "max_tokens": t.max_tokens,
                             "stream": True, "stream_options": {"include_usage": True}})

    async def send(self, t: Tenant, rng: random.Random) -> None:
        import aiohttp
        import orjson

        data = self.body(t, rng)
        ans = Answer(t.name, t.klass or "standard", self.now())
        self.answers.append(ans)  # kept as it stands if the load stops first
        headers = {"Authorization": f"Bearer {t.key}", "Content-Type": "application/json"}
        try:
            async with self.session.post(self.url, data=data, headers=headers) as resp:
                ans.status = resp.status
                if resp.status != 200:
                    await resp.read()
                    return
                async for line in resp.content:
                    if not line.startswith(b"data: {"):
                        continue
                    event = orjson.loads(line[6:])
                    if math.isnan(ans.ttft) and any(
                            (c.get("delta") or {}).get("content")
                            for c in event.get("choices") or ()):
                        ans.ttft = self.now() - ans.sent
                    usage = event.get("usage")
                    if usage:
                        ans.prompt = int(usage.get("prompt_tokens") or 0)
                        ans.completion = int(usage.get("completion_tokens") or 0)
                        details = usage.get("prompt_tokens_details") or {}
                        ans.cached = int(details.get("cached_tokens") or 0)
                        timing = event.get("x_sim_timing") or {}
                        ans.engine_ttft = float(timing.get("engine_ttft_s", math.nan))
            if ans.completion:
                ans.done = self.now()
        except (aiohttp.ClientError, TimeoutError, ValueError):
            ans.status = ans.status or -1

    async def client(self, t: Tenant, index: int) -> None:
        """Backlogged: the next request as soon as the last one is answered."""
        rng = random.Random(f"{self.sc.seed}/{t.name}/{index}")
        while True:
            await self.send(t, rng)

    async def arrivals(self, t: Tenant) -> None:
        """Light: Poisson arrivals at `t.rate` per model second, each its own task."""
        rng = random.Random(f"{self.sc.seed}/{t.name}")
        loop = asyncio.get_running_loop()
        at = 0.0
        tasks: set[asyncio.Task[None]] = set()
        try:
            while True:
                at += rng.expovariate(t.rate)
                await asyncio.sleep(max(0.0, self.t0 + at / self.speed - loop.time()))
                task = asyncio.create_task(self.send(t, random.Random(rng.random())))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def sample_engines(session: Any, urls: Sequence[str], into: list[tuple[float, float]]
                         ) -> None:
    """(waiting, running) requests summed over the engines, every SAMPLE_EVERY_S."""
    while True:
        waiting = running = 0.0
        for u in urls:
            with contextlib.suppress(Exception):
                async with session.get(u + "/metrics") as resp:
                    m = parse_metrics(await resp.text())
                waiting += m.get("vllm:num_requests_waiting", 0.0)
                running += m.get("vllm:num_requests_running", 0.0)
        into.append((waiting, running))
        await asyncio.sleep(SAMPLE_EVERY_S)


async def router_queue_waits(session: Any, url: str) -> dict[str, tuple[float, float]]:
    """Per tenant: (seconds waited for a router slot, waits), summed over classes, from
    the router's deepinfer_tenant_queue_wait_seconds histogram (cumulative)."""
    async with session.get(url + "/metrics") as resp:
        text = await resp.text()
    out: dict[str, tuple[float, float]] = {}
    for line in text.splitlines():
        for i, suffix in enumerate(("_sum{", "_count{")):
            head = "deepinfer_tenant_queue_wait_seconds" + suffix
            if line.startswith(head):
                labels, value = line[len(head):].rsplit("} ", 1)
                tenant = labels.split('tenant="', 1)[1].split('"', 1)[0]
                pair = list(out.get(tenant, (0.0, 0.0)))
                pair[i] += float(value)
                out[tenant] = (pair[0], pair[1])
    return out


# --- one run ------------------------------------------------------------------------------
async def run_one(sc: Scenario, order: str, args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp

    speed = args.speed
    horizon, warmup = (QUICK_HORIZON_S, QUICK_WARMUP_S) if args.quick else (HORIZON_S,
                                                                            WARMUP_S)
    capacity = args.engines * args.max_num_seqs
    fleet: Fleet | None = None
    router: Router | None = None
    samples: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory(prefix="fairness-") as tmp:
        config = Path(tmp) / "router.toml"
        config.write_text(tenants_toml(sc))
        try:
            with engine_env(args):
                fleet = Fleet([args.kv_blocks] * args.engines, speed)
            extra = router_args(config, order.removesuffix("+reserve"), capacity)
            if args.engine_priority:
                extra += ["--engine-priority", "all"]
            if order == "fair+reserve":
                extra += ["--class-reserve", str(args.class_reserve)]
            router = Router(fleet.urls, args.policy, extra)
            connector = aiohttp.TCPConnector(limit=0)
            timeout = aiohttp.ClientTimeout(total=horizon / speed + 120)
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                await wait_ready(session, router.url, args.engines)
                loop = asyncio.get_running_loop()
                load = Load(session, router.url, sc, speed)
                load.t0 = loop.time()
                tasks = [asyncio.create_task(load.client(t, i))
                         for t in sc.tenants for i in range(t.clients)]
                tasks += [asyncio.create_task(load.arrivals(t)) for t in sc.tenants if t.rate]
                await asyncio.sleep(warmup / speed)
                mark0 = await asyncio.to_thread(fleet.mark)
                waits0 = await router_queue_waits(session, router.url)
                cpu0 = (cpu_seconds(router.proc.pid), cpu_seconds(fleet.proc.pid),
                        time.process_time())
                sampler = asyncio.create_task(sample_engines(session, fleet.urls, samples))
                await asyncio.sleep(max(0.0, load.t0 + horizon / speed - loop.time()))
                mark1 = await asyncio.to_thread(fleet.mark)
                waits1 = await router_queue_waits(session, router.url)
                cpu1 = (cpu_seconds(router.proc.pid), cpu_seconds(fleet.proc.pid),
                        time.process_time())
                for task in [*tasks, sampler]:  # the load stops at the horizon
                    task.cancel()
                await asyncio.gather(*tasks, sampler, return_exceptions=True)
                metrics = []
                for u in fleet.urls:
                    async with session.get(u + "/metrics") as resp:
                        metrics.append(parse_metrics(await resp.text()))
        finally:
            if fleet is not None:
                fleet.close()
            if router is not None:
                router.close()
    wall = max(mark1["t"] - mark0["t"], 1e-9)
    busy = [(b1 - b0) / wall for b0, b1 in zip(mark0["busy"], mark1["busy"], strict=True)]
    out = summarize(sc, load.answers, warmup, horizon)
    for name, t in out["tenants"].items():  # the router's side of the wait, in the window
        (s0, n0), (s1, n1) = waits0.get(name, (0.0, 0.0)), waits1.get(name, (0.0, 0.0))
        t["router_queue_wait_ms"] = (s1 - s0) / (n1 - n0) * speed * 1000 if n1 > n0 else 0.0
        t["router_queued"] = n1 - n0
    out.update({
        "scenario": sc.key,
        "order": order,
        "window_s": [warmup, horizon],
        "busy": busy,
        "busy_mean": statistics.fmean(busy),
        "engine_waiting_mean": statistics.fmean(w for w, _ in samples) if samples else 0.0,
        "engine_running_mean": statistics.fmean(r for _, r in samples) if samples else 0.0,
        "preemptions": sum(m.get("vllm:num_preemptions_total", 0.0) for m in metrics),
        "cpu": {name: (c1 - c0) / wall
                for name, c0, c1 in zip(("router", "fleet", "loadgen"), cpu0, cpu1,
                                        strict=True)},
        "loadavg_1m_after": os.getloadavg()[0],
    })
    return out


def summarize(sc: Scenario, answers: list[Answer], start: float, end: float
              ) -> dict[str, Any]:
    """Per tenant and per class over the window [start, end] (model seconds): work and
    requests of the answers completed in it; TTFT of the requests sent in it."""
    span = end - start
    done = [a for a in answers if start <= a.done <= end]
    total_work = sum(a.work for a in done)
    weights = {t.name: t.weight for t in sc.tenants}
    tenants: dict[str, Any] = {}
    for t in sc.tenants:
        mine = [a for a in done if a.tenant == t.name]
        work = sum(a.work for a in mine)
        prompt = sum(a.prompt for a in mine)
        tenants[t.name] = {
            "class": t.klass or "standard",
            "weight": t.weight,
            "weight_share": t.weight / sum(weights.values()),
            "completed": len(mine),
            "work_tokens": work,
            "work_share": work / total_work if total_work else 0.0,
            "cached_share": sum(a.cached for a in mine) / prompt if prompt else 0.0,
            "ttft_ms": ttft_stats([a for a in answers if a.tenant == t.name], start, end),
            "engine_ttft_ms": engine_ttft_stats([a for a in answers if a.tenant == t.name],
                                                start, end),
        }
    classes = sorted({a.klass for a in answers})
    errors = [a for a in answers if a.status not in (0, 200)]
    return {
        "tenants": tenants,
        "ttft_ms_by_class": {k: ttft_stats([a for a in answers if a.klass == k], start, end)
                             for k in classes},
        "engine_ttft_ms_by_class": {
            k: engine_ttft_stats([a for a in answers if a.klass == k], start, end)
            for k in classes},
        "work_tokens_per_s": total_work / span,
        "completed": len(done),
        "sent": len(answers),
        "errors": len(errors),
        "error_statuses": sorted({a.status for a in errors}),
    }


def ttft_stats(answers: list[Answer], start: float, end: float) -> dict[str, float]:
    """TTFT (model ms) of the requests sent in [start, end); those still without a first
    token at `end` count at their wait so far (`censored`)."""
    sent = [a for a in answers if start <= a.sent < end and a.status in (0, 200)]
    xs = [(a.ttft if not math.isnan(a.ttft) else end - a.sent) * 1000 for a in sent]
    censored = sum(1 for a in sent if math.isnan(a.ttft))
    return {"p50": pct(xs, 0.5), "p90": pct(xs, 0.9), "p99": pct(xs, 0.99), "n": len(xs),
            "censored": censored}


def engine_ttft_stats(answers: list[Answer], start: float, end: float) -> dict[str, float]:
    """The engine's part of the TTFT (model ms: its own queue and the prefill, as the
    simulator reports it) of the answered requests sent in [start, end)."""
    xs = [a.engine_ttft * 1000 for a in answers
          if start <= a.sent < end and not math.isnan(a.engine_ttft)]
    return {"p50": pct(xs, 0.5), "p90": pct(xs, 0.9), "n": len(xs)}


# --- targets and the table ----------------------------------------------------------------
@dataclass
class Measure:
    """One row of the table: a figure per order, and a target where there is one."""

    scenario: str
    name: str
    what: str
    values: dict[str, float] = field(default_factory=dict)  # per order
    met: dict[str, bool] = field(default_factory=dict)  # per order, where a target applies
    fmt: str = "{:.3f}"


def jain(xs: Sequence[float]) -> float:
    return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs)) if any(xs) else 0.0


def measures(results: list[dict[str, Any]]) -> list[Measure]:
    by = {(r["scenario"], r["order"]): r for r in results}
    orders = [o for o in ORDERS if any(r["order"] == o for r in results)]
    out: list[Measure] = []
    for key in sorted({r["scenario"] for r in results}):
        runs = {o: by[(key, o)] for o in orders if (key, o) in by}
        if key == "A":
            for tenant in SCENARIOS["A"].tenants:
                m = Measure("A", f"share_vs_weight_{tenant.name}",
                            f"{tenant.name} work share / weight share (|x - 1| <= 0.1)")
                for o, r in runs.items():
                    t = r["tenants"][tenant.name]
                    m.values[o] = t["work_share"] / t["weight_share"]
                    m.met[o] = abs(m.values[o] - 1) <= 0.1
                out.append(m)
            m = Measure("A", "jain_weighted", "Jain's index of weight-normalised shares")
            for o, r in runs.items():
                m.values[o] = jain([t["work_share"] / t["weight_share"]
                                    for t in r["tenants"].values()])
            out.append(m)
        elif key == "B":
            inter = Measure("B", "ttft_p90_interactive", "interactive TTFT p90 (ms)",
                            fmt="{:.0f}")
            at_engine = Measure("B", "engine_ttft_p90_interactive",
                                "interactive TTFT p90 at the engines (ms)", fmt="{:.0f}")
            batch = Measure("B", "ttft_p90_batch", "batch TTFT p90 (ms)", fmt="{:.0f}")
            vs_batch = Measure("B", "interactive_vs_batch",
                               "interactive TTFT p90 / batch TTFT p90 (<= 0.1)")
            vs_fifo = Measure("B", "interactive_vs_fifo",
                              "interactive TTFT p90 / fifo's (<= 0.1)")
            tput = Measure("B", "work_per_s", "engine work tokens/s", fmt="{:.0f}")
            tput_fifo = Measure("B", "work_vs_fifo", "engine work tokens/s / fifo's (>= 0.9)")
            fifo = runs.get("fifo")
            for o, r in runs.items():
                i90 = r["ttft_ms_by_class"]["interactive"]["p90"]
                b90 = r["ttft_ms_by_class"]["batch"]["p90"]
                inter.values[o], batch.values[o] = i90, b90
                at_engine.values[o] = r["engine_ttft_ms_by_class"]["interactive"]["p90"]
                vs_batch.values[o] = i90 / b90
                vs_batch.met[o] = i90 <= 0.1 * b90
                tput.values[o] = r["work_tokens_per_s"]
                if fifo is not None:
                    f90 = fifo["ttft_ms_by_class"]["interactive"]["p90"]
                    vs_fifo.values[o] = i90 / f90
                    vs_fifo.met[o] = i90 <= 0.1 * f90
                    tput_fifo.values[o] = r["work_tokens_per_s"] / fifo["work_tokens_per_s"]
                    tput_fifo.met[o] = tput_fifo.values[o] >= 0.9
            out += [inter, at_engine, batch, vs_batch, vs_fifo, tput, tput_fifo]
        elif key == "C":
            ratio = Measure("C", "reuse_vs_fresh_completed",
                            "requests completed, reuse / fresh (> 1)")
            cached = Measure("C", "reuse_cached_share", "reuse: prompt tokens found cached",
                             fmt="{:.1%}")
            for o, r in runs.items():
                t = r["tenants"]
                ratio.values[o] = t["reuse"]["completed"] / max(t["fresh"]["completed"], 1)
                ratio.met[o] = t["reuse"]["completed"] > t["fresh"]["completed"]
                cached.values[o] = t["reuse"]["cached_share"]
            out += [ratio, cached]
    return out


def table(ms: list[Measure], orders: Sequence[str]) -> str:
    lines = ["| scenario | measure | " + " | ".join(orders) + " |",
             "|---|---|" + "--:|" * len(orders)]
    for m in ms:
        cells = []
        for o in orders:
            if o not in m.values:
                cells.append("-")
                continue
            v = m.fmt.format(m.values[o])
            if o in m.met:
                v += " met" if m.met[o] else " **missed**"
            cells.append(v)
        lines.append(f"| {SCENARIOS[m.scenario].title} | {m.what} | " + " | ".join(cells)
                     + " |")
    return "\n".join(lines)


def tenant_table(results: list[dict[str, Any]]) -> str:
    lines = ["| scenario | order | tenant | class | weight | completed | work share "
             "| cached | TTFT p50 | p90 | p99 | censored | engine p90 | router wait |",
             "|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in results:
        for name, t in r["tenants"].items():
            q = t["ttft_ms"]
            lines.append(
                f"| {r['scenario']} | {r['order']} | {name} | {t['class']} | {t['weight']:g} "
                f"| {t['completed']} | {t['work_share']:.1%} | {t['cached_share']:.0%} "
                f"| {q['p50']:.0f} | {q['p90']:.0f} | {q['p99']:.0f} | {q['censored']} "
                f"| {t['engine_ttft_ms']['p90']:.0f} | {t['router_queue_wait_ms']:.0f} |")
    return "\n".join(lines)


def report_line(r: dict[str, Any], wall: float) -> None:
    shares = "  ".join(f"{n} {t['completed']}req/{t['work_share']:.0%}"
                       f"/p90 {t['ttft_ms']['p90']:.0f}ms/queued {t['router_queued']:.0f} "
                       f"{t['router_queue_wait_ms']:.0f}ms" for n, t in r["tenants"].items())
    print(f"[{r['scenario']} {r['order']:<11}] {shares}  work {r['work_tokens_per_s']:.0f} "
          f"tok/s  errors {r['errors']}  busy {r['busy_mean']:.0%}  engine waiting "
          f"{r['engine_waiting_mean']:.1f} running {r['engine_running_mean']:.1f}  cpu router "
          f"{r['cpu']['router']:.0%} fleet {r['cpu']['fleet']:.0%} gen "
          f"{r['cpu']['loadgen']:.0%}  ({wall:.0f}s)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--orders", default=",".join(ORDERS))
    ap.add_argument("--quick", action="store_true",
                    help=f"{QUICK_HORIZON_S:.0f} model seconds a run ({QUICK_WARMUP_S:.0f} of "
                    f"warm-up) instead of {HORIZON_S:.0f} ({WARMUP_S:.0f})")
    ap.add_argument("--speed", type=float, default=SPEED)
    ap.add_argument("--engines", type=int, default=N_ENGINES)
    ap.add_argument("--max-num-seqs", type=int, default=MAX_NUM_SEQS)
    ap.add_argument("--kv-blocks", type=int, default=KV_BLOCKS)
    ap.add_argument("--policy", default="kv-aware",
                    help="routing policy (kv-aware: the one whose index tells the fair "
                    "queue what is cached)")
    ap.add_argument("--engine-priority", action="store_true",
                    help="engines schedule by priority (vLLM's --scheduling-policy "
                    "priority) and the router passes each request's class to them "
                    "(--engine-priority all); default: engines first come first served")
    ap.add_argument("--class-reserve", type=float, default=RESERVE,
                    help="the router's --class-reserve in the fair+reserve order (the share "
                    "of slots each class leaves to the classes above it)")
    ap.add_argument("--held-back", action="store_true",
                    help="the held-back run: other seeds and 4 engines x 4 sequences "
                    f"(written to {HELD_BACK_OUT.relative_to(HERE.parent)} unless --out)")
    ap.add_argument("--src", help="measure the router and engines of this source tree "
                    "(default: this checkout)")
    ap.add_argument("--out", default=None, help="the JSON written")
    args = ap.parse_args()
    if args.held_back:
        args.engines, args.max_num_seqs = HELD_BACK_FLEET
    if args.out is None:
        args.out = str(HELD_BACK_OUT if args.held_back else DEFAULT_OUT)
    if args.src:
        os.environ["DEEPINFER_BENCH_SRC"] = str(Path(args.src).resolve())
        os.execv(sys.executable, [sys.executable, str(Path(__file__).resolve()),
                                  *strip_src(sys.argv[1:])])
    keys = [s.strip().upper() for s in args.scenarios.split(",") if s.strip()]
    orders = [o.strip() for o in args.orders.split(",") if o.strip()]
    for name, given, known in (("scenario", keys, SCENARIOS), ("order", orders, ORDERS)):
        for g in given:
            if g not in known:
                raise SystemExit(f"unknown {name} {g!r}")
    orders = [o for o in ORDERS if o in orders]
    started = time.monotonic()
    results: list[dict[str, Any]] = []
    for key in keys:
        for order in orders:
            t = time.monotonic()
            sc = SCENARIOS[key]
            if args.held_back:
                sc = dataclasses.replace(sc, seed=sc.seed + HELD_BACK_SEED_OFFSET)
            r = asyncio.run(run_one(sc, order, args))
            r["wall_s"] = time.monotonic() - t
            results.append(r)
            report_line(r, r["wall_s"])
    ms = measures(results)
    horizon, warmup = (QUICK_HORIZON_S, QUICK_WARMUP_S) if args.quick else (HORIZON_S,
                                                                            WARMUP_S)
    targets: list[dict[str, Any]] = [
        {"scenario": m.scenario, "target": m.name, "what": m.what, "order": o,
         "value": round(m.values[o], 4), "met": ok}
        for m in ms for o, ok in m.met.items()]
    report: dict[str, Any] = {
        "command": "python benchmarks/fairness.py " + " ".join(sys.argv[1:]),
        "source": {"dir": str(ROOT), "revision": source_revision()},
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count()},
        "wall_s": time.monotonic() - started,
        "calibration": {
            "engines": args.engines,
            "max_num_seqs": args.max_num_seqs,
            "capacity": args.engines * args.max_num_seqs,
            "kv_blocks": args.kv_blocks,
            "speed": args.speed,
            "policy": args.policy,
            "engine_priority": args.engine_priority,
            "held_back": args.held_back,
            "seed_offset": HELD_BACK_SEED_OFFSET if args.held_back else 0,
            "class_reserve": args.class_reserve,
            "horizon_s": horizon,
            "warmup_s": warmup,
            "router": ("--max-inflight = capacity, --max-queue "
                       f"{MAX_QUEUE}, --queue-timeout-s {QUEUE_TIMEOUT_S:g}, "
                       "--max-inflight-per-engine default, tenants in --config"),
            "cost_model": "deepinfer_engine/sim defaults (step 6 ms + 40 us/prefill token + "
                          "30 us/decode seq + 40 ns/context token; 8192-token steps)",
            "time_unit": "model seconds: wall-clock x speed",
            "work": "prompt_tokens - cached_tokens + completion_tokens of each answer",
        },
        "scenarios": {k: asdict(SCENARIOS[k]) for k in keys},
        "results": results,
        "measures": [asdict(m) for m in ms],
        "targets": targets,
    }
    out = Path(args.out)
    if not out.suffix:
        out = out.with_suffix(".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=float) + "\n")
    print(f"\n{table(ms, orders)}\n\n{tenant_table(results)}\n")
    for name in ("fair", "fair+reserve"):
        fair = [t for t in targets if t["order"] == name]
        if fair:
            print(f"{name} order: {sum(t['met'] for t in fair)}/{len(fair)} targets met")
    print(f"wrote {out} in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
