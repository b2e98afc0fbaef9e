"""Routing quality: simulated vLLM engines driven through the real router over HTTP.

For every workload and policy a fresh fleet is started (empty KV caches), the router runs
as a subprocess (`deepinfer-router --engine URL... --policy P --log-level warning`), and
an open-loop, seeded load generator in this process sends streaming chat completions and
measures the time to first token client-side.

Processes (the reference machine has 2 cores):
  - the fleet: one subprocess running N simulated engines (`start_sim_server`) on one
    uvloop event loop (`python benchmarks/routing.py _sims ...`);
  - the router: one subprocess per run;
  - the load generator: this process (aiohttp, open-loop Poisson arrivals).

Time: the engines run `--speed S` times faster than the modelled GPU, so every arrival
time and think time is divided by S and every measured latency is multiplied by S. All
latencies and rates reported are in *model* seconds (what the modelled H100 would see);
the router's own overhead (~1 ms of wall time) is therefore inflated S times, which only
makes the numbers conservative for the policies that serve from cache.

Workloads (seeded; the same requests for every policy):
  1 chat       users (Poisson arrivals) share a ~1,000-token system prompt, each with their
               own growing history, several rounds with think time between them; each
               user sends its OpenAI `user` id (the session key the router reads)
  2 groups     a handful of long (3-5k token) shared prefixes, short distinct questions
  3 distinct   distinct prompts, nothing shared (no regression allowed here)
  4 hot        one hot 4k-token prefix takes half of the traffic, the rest is distinct

Policies: round-robin, least-conn, session, kv-aware (through the router), and oracle:
the load generator asks every engine `POST /debug/cached_tokens` and sends the request
straight to the one holding the most (ties by fewest requests in flight from here),
bypassing the router; its TTFT is measured from the moment it sends to the engine.

Reported per workload and policy: TTFT p50/p90/p99, output tokens/s, the engines' own
prefix-cache hit rate (sum of vllm:prefix_cache_hits_total / queries_total scraped from
their /metrics), load imbalance (max/mean requests per engine), engine busy share, and
the CPU share of the router and fleet processes (to show neither is the bottleneck).

Engine busy share: the fleet process adds up the modelled duration of every engine step
(an engine steps back to back while it has any request) over the arrival window, divided
by that window's wall time.

    python benchmarks/routing.py [--workloads 1,2,3,4] [--policies round-robin,...]
                                 [--quick] [--speed 5] [--out benchmarks/results/routing]
    python benchmarks/routing.py --calibrate      # least-conn only: busy share per workload
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# The router and engine code measured: this checkout, or --src DIR (e.g. an exported
# commit, `git archive HEAD | tar -x -C DIR`, to measure while the tree is being edited).
ROOT = Path(os.environ.get("DEEPINFER_BENCH_SRC") or HERE.parent).resolve()
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODEL = "sim-model"
POLICIES = ("round-robin", "least-conn", "session", "kv-aware", "oracle")
DEFAULT_OUT = HERE / "results" / "routing"

# --- calibration (fixed before any tuning; recorded in the JSON) ------------------------
# The engine: the simulator's default cost model (8B model on one H100, see
# engines/sim/cost.py) with a KV cache of KV_BLOCKS x 16 tokens, smaller than every
# workload's working set (see WORKLOADS[*]["working_set_tokens"]).
N_ENGINES = 4
KV_BLOCKS = 1024  # 16,384 tokens per engine, 65,536 for the fleet of 4
BLOCK_SIZE = 16
SPEED = 2.5

# Arrival rates (model seconds) chosen so that engines are 60-80% busy under least-conn.
WORKLOADS: dict[str, dict[str, Any]] = {
    "1": {
        "name": "chat",
        "title": "1 multi-round chat",
        "users_per_s": 0.38,  # new users per model second
        "duration_s": 100.0,  # users arrive during this window
        "rounds": 10,
        "system_tokens": 1000,
        "user_msg_tokens": (20, 150),
        "think_s": 3.0,  # mean (exponential) pause between an answer and the next turn
        "max_tokens": 200,
    },
    "2": {
        "name": "groups",
        "title": "2 shared-prefix groups",
        "rate": 13.5,  # requests per model second
        "duration_s": 120.0,
        "groups": 8,
        "prefix_tokens": (3000, 5000),
        "question_tokens": (20, 80),
        "max_tokens": 32,
    },
    "3": {
        "name": "distinct",
        "title": "3 no sharing",
        "rate": 11.0,
        "duration_s": 120.0,
        "prompt_tokens": (500, 2500),
        "max_tokens": 48,
    },
    "4": {
        "name": "hot",
        "title": "4 one hot prefix (50%)",
        "rate": 15.0,
        "duration_s": 120.0,
        "hot_share": 0.5,
        "prefix_tokens": 4000,
        "question_tokens": (20, 80),
        "cold_tokens": (500, 2500),
        "max_tokens": 32,
    },
}


# --- text -------------------------------------------------------------------------------
class Text:
    """Seeded random words of 1-5 letters: each ' word' is exactly one simulator token
    (~4 characters, the router's default chars-per-token)."""

    def __init__(self, seed: int) -> None:
        rng = random.Random(seed)
        letters = "abcdefghijklmnopqrstuvwxyz"
        self.vocab = [
            " " + "".join(rng.choice(letters) for _ in range(rng.randint(1, 5)))
            for _ in range(20_000)
        ]

    def words(self, rng: random.Random, n: int) -> str:
        return "".join(rng.choices(self.vocab, k=n))


@dataclass(slots=True)
class Req:
    at: float  # model seconds after the start
    body: dict[str, Any]
    kind: str = ""


@dataclass(slots=True)
class User:
    at: float
    user: str
    messages: list[str]  # one user message per round
    thinks: list[float]


def build_open(wl: dict[str, Any], seed: int, scale: float) -> list[Req]:
    """Poisson arrivals of independent requests (workloads 2-4)."""
    rng = random.Random(seed)
    text = Text(seed + 1)
    name = wl["name"]
    duration = wl["duration_s"] * scale
    prefixes: list[str] = []
    if name == "groups":
        lo, hi = wl["prefix_tokens"]
        prefixes = [
            f"Document {g}:" + text.words(rng, rng.randint(lo, hi)) for g in range(wl["groups"])
        ]
    elif name == "hot":
        prefixes = ["Hot document:" + text.words(rng, wl["prefix_tokens"])]
    out: list[Req] = []
    t = 0.0
    i = 0
    while True:
        t += rng.expovariate(wl["rate"])
        if t >= duration:
            return out
        i += 1
        if name == "groups":
            g = rng.randrange(len(prefixes))
            q = text.words(rng, rng.randint(*wl["question_tokens"]))
            msgs = [{"role": "system", "content": prefixes[g]},
                    {"role": "user", "content": f"Question {i}:{q}"}]
            kind = f"group{g}"
        elif name == "hot" and rng.random() < wl["hot_share"]:
            q = text.words(rng, rng.randint(*wl["question_tokens"]))
            msgs = [{"role": "system", "content": prefixes[0]},
                    {"role": "user", "content": f"Question {i}:{q}"}]
            kind = "hot"
        else:
            lo, hi = wl["cold_tokens"] if name == "hot" else wl["prompt_tokens"]
            prompt = f"Request {i}:" + text.words(rng, rng.randint(lo, hi))
            msgs = [{"role": "user", "content": prompt}]
            kind = "distinct"
        out.append(Req(t, {"model": MODEL, "messages": msgs, "max_tokens": wl["max_tokens"]}, kind))


def build_chat(wl: dict[str, Any], seed: int, scale: float) -> tuple[str, list[User]]:
    rng = random.Random(seed)
    text = Text(seed + 1)
    system = "You are a helpful assistant." + text.words(rng, wl["system_tokens"])
    users: list[User] = []
    t = 0.0
    duration = wl["duration_s"] * scale
    while True:
        t += rng.expovariate(wl["users_per_s"])
        if t >= duration:
            return system, users
        n = len(users)
        msgs = [f"User {n} turn {r}:" + text.words(rng, rng.randint(*wl["user_msg_tokens"]))
                for r in range(wl["rounds"])]
        thinks = [rng.expovariate(1.0 / wl["think_s"]) for _ in range(wl["rounds"])]
        users.append(User(t, f"user-{n}", msgs, thinks))


# --- the fleet subprocess -----------------------------------------------------------------
def sims_main(argv: Sequence[str]) -> None:
    """`routing.py _sims N KV_BLOCKS SPEED`: run N simulated engines on one event loop.
    Prints {"urls": [...]} once; then each "mark" line on stdin is answered with one JSON
    line {"t": wall, "busy": [modelled busy wall-seconds per engine, cumulative]}."""
    import logging

    import uvloop

    from engines.sim.server import start_sim_server
    from engines.sim.settings import SimSettings

    n, kv_blocks, speed = int(argv[0]), int(argv[1]), float(argv[2])
    logging.basicConfig(level=logging.WARNING)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        sims = []
        busy = [0.0] * n
        for i in range(n):
            settings = SimSettings(model=MODEL, kv_blocks=kv_blocks, block_size=BLOCK_SIZE,
                                   speed=speed, seed=i, log_level="warning")
            sim = await start_sim_server(settings, "127.0.0.1", 0, register=False)
            engine = sim.state.engine
            schedule = engine.schedule

            def counted(now: float, _s: Any = schedule, _i: int = i) -> Any:
                step = _s(now)
                if step is not None:
                    busy[_i] += step.duration
                return step

            engine.schedule = counted  # type: ignore[method-assign]
            sims.append(sim)
        print(json.dumps({"urls": [s.url for s in sims]}), flush=True)
        done = asyncio.Event()

        def on_line(line: str) -> None:
            cmd = line.strip()
            if cmd == "mark":
                print(json.dumps({"t": time.monotonic(), "busy": list(busy)}), flush=True)
            elif cmd in ("quit", ""):
                done.set()

        def reader() -> None:
            for line in sys.stdin:
                loop.call_soon_threadsafe(on_line, line)
                if line.strip() == "quit":
                    return
            loop.call_soon_threadsafe(done.set)

        threading.Thread(target=reader, daemon=True).start()
        await done.wait()
        for sim in sims:
            await sim.close()

    uvloop.run(run())


class Fleet:
    def __init__(self, n: int, kv_blocks: int, speed: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "_sims", str(n), str(kv_blocks),
             str(speed)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=src_env(),
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the simulated fleet did not start")
        self.urls: list[str] = json.loads(line)["urls"]

    def mark(self) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("mark\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        with contextlib.suppress(Exception):
            assert self.proc.stdin is not None
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def src_env() -> dict[str, str]:
    env = dict(os.environ, DEEPINFER_BENCH_SRC=str(ROOT))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Router:
    def __init__(self, urls: Sequence[str], policy: str, extra: Sequence[str] = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # deepinfer-router, from the source tree measured (ROOT)
        cmd = [sys.executable, "-c",
               "import sys; from deepinfer_router.cli import main; sys.exit(main())"]
        for u in urls:
            cmd += ["--engine", u]
        cmd += ["--policy", policy, "--host", "127.0.0.1", "--port", str(self.port),
                "--log-level", "warning", *extra]
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=src_env(), start_new_session=True)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- the load generator -----------------------------------------------------------------
@dataclass(slots=True)
class Result:
    kind: str
    ok: bool
    ttft: float = math.nan  # wall seconds
    e2e: float = math.nan
    out_tokens: int = 0
    engine: str = ""
    route: str = ""
    text: str = ""


@dataclass
class Gen:
    speed: float
    session: Any
    router_url: str | None  # None: oracle (straight to engines)
    engine_urls: list[str]
    engine_ids: list[str]
    inflight: dict[str, int] = field(default_factory=dict)
    results: list[Result] = field(default_factory=list)
    t_first: float = 0.0
    t_last: float = 0.0

    async def oracle_pick(self, body: dict[str, Any]) -> int:
        import orjson

        data = orjson.dumps(body)

        async def ask(url: str) -> int:
            async with self.session.post(url + "/debug/cached_tokens", data=data,
                                         headers={"Content-Type": "application/json"}) as resp:
                return int((await resp.json())["cached_tokens"])

        cached = await asyncio.gather(*(ask(u) for u in self.engine_urls))
        best = max(range(len(cached)),
                   key=lambda i: (cached[i], -self.inflight.get(self.engine_ids[i], 0)))
        return best

    async def send(self, body: dict[str, Any], kind: str, user: str | None = None) -> Result:
        import orjson

        body = dict(body, stream=True, stream_options={"include_usage": True})
        if user is not None:
            body["user"] = user
        if self.router_url is None:
            idx = await self.oracle_pick(body)
            url, eid, route = self.engine_urls[idx], self.engine_ids[idx], "oracle"
        else:
            url, eid, route = self.router_url, "", ""
        res = Result(kind, False)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        if eid:
            self.inflight[eid] = self.inflight.get(eid, 0) + 1
        pieces: list[str] = []
        try:
            async with self.session.post(url + "/v1/chat/completions", data=orjson.dumps(body),
                                         headers={"Content-Type": "application/json"}) as r:
                res.engine = r.headers.get("x-deepinfer-engine", eid)
                res.route = r.headers.get("x-deepinfer-route", route)
                if r.status != 200:
                    await r.read()
                    return res
                async for line in r.content:
                    if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                        continue
                    event = orjson.loads(line[6:])
                    if "error" in event:
                        return res
                    for choice in event.get("choices") or ():
                        content = (choice.get("delta") or {}).get("content")
                        if content:
                            if not pieces:
                                res.ttft = loop.time() - t0
                            pieces.append(content)
                    usage = event.get("usage")
                    if usage:
                        res.out_tokens = int(usage.get("completion_tokens") or 0)
            res.e2e = loop.time() - t0
            res.text = "".join(pieces)
            res.ok = bool(pieces)
            return res
        except (TimeoutError, OSError, ValueError) as exc:
            res.route = f"error:{type(exc).__name__}"
            return res
        finally:
            if eid:
                self.inflight[eid] -= 1
            self.results.append(res)


async def drive_open(gen: Gen, reqs: list[Req]) -> None:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    tasks = []
    for req in reqs:
        delay = t0 + req.at / gen.speed - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(gen.send(req.body, req.kind)))
    gen.t_last = loop.time()
    await asyncio.gather(*tasks)


async def drive_chat(gen: Gen, system: str, users: list[User], max_tokens: int) -> None:
    loop = asyncio.get_running_loop()
    t0 = loop.time()

    async def converse(u: User) -> None:
        await asyncio.sleep(max(0.0, t0 + u.at / gen.speed - loop.time()))
        msgs: list[dict[str, str]] = [{"role": "system", "content": system}]
        for r, (text, think) in enumerate(zip(u.messages, u.thinks, strict=True)):
            msgs.append({"role": "user", "content": text})
            body = {"model": MODEL, "messages": msgs, "max_tokens": max_tokens}
            res = await gen.send(body, f"round{r}", user=u.user)
            if not res.ok:
                return
            msgs = [*msgs, {"role": "assistant", "content": res.text}]
            await asyncio.sleep(think / gen.speed)

    tasks = [asyncio.create_task(converse(u)) for u in users]
    gen.t_last = t0 + (users[-1].at / gen.speed if users else 0.0)
    await asyncio.gather(*tasks)


def parse_metrics(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        try:
            value = float(line.rsplit(" ", 1)[1])
        except (IndexError, ValueError):
            continue
        out[name] = out.get(name, 0.0) + value
    return out


async def wait_ready(session: Any, url: str, n: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            async with session.get(url + "/ready") as r:
                if r.status == 200:
                    detail = await r.json()
                    if detail["engines"]["healthy"] >= n:
                        return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"router at {url} not ready with {n} engines")


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return math.nan
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo = math.floor(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def run_one(
    wkey: str, policy: str, args: argparse.Namespace, rep: int = 0
) -> dict[str, Any]:
    import aiohttp

    from deepinfer_router.engine_record import engine_id_for

    wl = WORKLOADS[wkey]
    seed = (args.seed + rep) * 1000 + int(wkey)
    scale = 0.4 if args.quick else 1.0
    speed = args.speed
    fleet = Fleet(args.engines, args.kv_blocks, speed)
    router: Router | None = None
    try:
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            ids = [engine_id_for(u) for u in fleet.urls]
            if policy != "oracle":
                router = Router(fleet.urls, policy, args.router_arg or ())
                await wait_ready(session, router.url, args.engines)
            gen = Gen(speed, session, router.url if router else None, fleet.urls, ids)
            mark0 = fleet.mark()
            cpu0 = (cpu_seconds(router.proc.pid) if router else 0.0,
                    cpu_seconds(fleet.proc.pid), time.process_time())
            wall0 = time.monotonic()
            mark1: dict[str, Any] = {}
            cpu1: tuple[float, float, float] = (0.0, 0.0, 0.0)

            async def at_arrivals_end() -> None:
                nonlocal mark1, cpu1
                while gen.t_last == 0.0:
                    await asyncio.sleep(0.05)
                await asyncio.sleep(max(0.0, gen.t_last - asyncio.get_running_loop().time()))
                mark1 = await asyncio.to_thread(fleet.mark)
                cpu1 = (cpu_seconds(router.proc.pid) if router else 0.0,
                        cpu_seconds(fleet.proc.pid), time.process_time())

            marker = asyncio.create_task(at_arrivals_end())
            if wl["name"] == "chat":
                system, users = build_chat(wl, seed, scale)
                n_offered = len(users) * wl["rounds"]
                await drive_chat(gen, system, users, wl["max_tokens"])
            else:
                reqs = build_open(wl, seed, scale)
                n_offered = len(reqs)
                await drive_open(gen, reqs)
            await marker
            wall_total = time.monotonic() - wall0
            metrics = []
            for u in fleet.urls:
                async with session.get(u + "/metrics") as resp:
                    metrics.append(parse_metrics(await resp.text()))
    finally:
        if router is not None:
            router.close()
        fleet.close()

    window = mark1["t"] - mark0["t"]
    busy = [(b1 - b0) / window for b0, b1 in zip(mark0["busy"], mark1["busy"], strict=True)]
    res = gen.results
    ok = [r for r in res if r.ok]
    ttft = [r.ttft * speed * 1000 for r in ok]  # model ms
    hits = sum(m.get("vllm:prefix_cache_hits_total", 0.0) for m in metrics)
    queries = sum(m.get("vllm:prefix_cache_queries_total", 0.0) for m in metrics)
    per_engine = {eid: 0 for eid in ids}
    for r in ok:
        per_engine[r.engine] = per_engine.get(r.engine, 0) + 1
    counts = list(per_engine.values())
    routes: dict[str, int] = {}
    for r in res:
        routes[r.route] = routes.get(r.route, 0) + 1
    by_kind: dict[str, list[float]] = {}
    for r in ok:
        by_kind.setdefault(r.kind, []).append(r.ttft * speed * 1000)
    ttft_by_kind = {k: {"n": len(v), "p50": pct(v, 0.5), "p90": pct(v, 0.9)}
                    for k, v in sorted(by_kind.items())}
    out_tokens = sum(r.out_tokens for r in ok)
    model_makespan = wall_total * speed
    return {
        "workload": wkey,
        "policy": policy,
        "requests": len(res),
        "offered": n_offered,
        "ok": len(ok),
        "errors": len(res) - len(ok),
        "ttft_ms": {"p50": pct(ttft, 0.5), "p90": pct(ttft, 0.9), "p99": pct(ttft, 0.99),
                    "mean": statistics.fmean(ttft) if ttft else math.nan},
        "ttft_ms_by_kind": ttft_by_kind,
        "output_tokens_per_s": out_tokens / model_makespan,
        "hit_rate": hits / queries if queries else 0.0,
        "prefix_cache_hits": hits,
        "prefix_cache_queries": queries,
        "imbalance": max(counts) / statistics.fmean(counts) if counts and sum(counts) else 0.0,
        "requests_per_engine": counts,
        "busy": busy,
        "busy_mean": statistics.fmean(busy),
        "routes": routes,
        "cpu": {
            "router": (cpu1[0] - cpu0[0]) / window,
            "fleet": (cpu1[1] - cpu0[1]) / window,
            "loadgen": (cpu1[2] - cpu0[2]) / window,
        },
        "wall_s": wall_total,
        "loadavg_1m_after": os.getloadavg()[0],  # other work on the machine adds noise
        "arrival_window_wall_s": window,
        "preemptions": sum(m.get("vllm:num_preemptions_total", 0.0) for m in metrics),
        "seed": seed,
        # Raw samples for pooling repeats (merge_repeats); not written to the JSON.
        "_ttft": ttft,
        "_by_kind": by_kind,
        "_out_tokens": out_tokens,
        "_model_makespan": model_makespan,
    }


def merge_repeats(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from repeats of a (workload, policy) with different seeds: TTFT
    percentiles over the pooled samples (a p99 over one run rests on ~13 samples and
    moves by +-15% between seeds), counters summed, shares averaged; each repeat's own
    percentiles are kept under "repeats" to show the spread."""
    first = runs[0]
    if len(runs) == 1:
        merged = dict(first)
    else:
        ttft = [x for r in runs for x in r["_ttft"]]
        by_kind: dict[str, list[float]] = {}
        for r in runs:
            for k, v in r["_by_kind"].items():
                by_kind.setdefault(k, []).extend(v)
        hits = sum(r["prefix_cache_hits"] for r in runs)
        queries = sum(r["prefix_cache_queries"] for r in runs)
        per_engine = [sum(c) for c in zip(*(r["requests_per_engine"] for r in runs), strict=True)]
        routes: dict[str, int] = {}
        for r in runs:
            for k, n in r["routes"].items():
                routes[k] = routes.get(k, 0) + n
        busy = [statistics.fmean(b) for b in zip(*(r["busy"] for r in runs), strict=True)]
        merged = dict(first)
        merged.update({
            "requests": sum(r["requests"] for r in runs),
            "offered": sum(r["offered"] for r in runs),
            "ok": sum(r["ok"] for r in runs),
            "errors": sum(r["errors"] for r in runs),
            "ttft_ms": {"p50": pct(ttft, 0.5), "p90": pct(ttft, 0.9), "p99": pct(ttft, 0.99),
                        "mean": statistics.fmean(ttft) if ttft else math.nan},
            "ttft_ms_by_kind": {k: {"n": len(v), "p50": pct(v, 0.5), "p90": pct(v, 0.9)}
                                for k, v in sorted(by_kind.items())},
            "output_tokens_per_s": sum(r["_out_tokens"] for r in runs)
            / sum(r["_model_makespan"] for r in runs),
            "hit_rate": hits / queries if queries else 0.0,
            "prefix_cache_hits": hits,
            "prefix_cache_queries": queries,
            "imbalance": statistics.fmean(r["imbalance"] for r in runs),
            "requests_per_engine": per_engine,
            "busy": busy,
            "busy_mean": statistics.fmean(busy),
            "routes": routes,
            "cpu": {k: statistics.fmean(r["cpu"][k] for r in runs) for k in first["cpu"]},
            "wall_s": sum(r["wall_s"] for r in runs),
            "preemptions": sum(r["preemptions"] for r in runs),
            "seed": [r["seed"] for r in runs],
            "repeats": [{"seed": r["seed"], **{q: round(r["ttft_ms"][q], 1)
                                               for q in ("p50", "p90", "p99")},
                         "hit_rate": round(r["hit_rate"], 4)} for r in runs],
        })
    return {k: v for k, v in merged.items() if not k.startswith("_")}


# --- report -------------------------------------------------------------------------------
def targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {(r["workload"], r["policy"]): r for r in results}
    out: list[dict[str, Any]] = []

    def add(name: str, wk: str, value: float, limit: float, ok: bool, what: str) -> None:
        out.append({"target": name, "workload": wk, "value": round(value, 3),
                    "limit": limit, "met": bool(ok), "what": what})

    for wk in ("1", "2"):
        kv, rr, orc = by.get((wk, "kv-aware")), by.get((wk, "round-robin")), by.get((wk, "oracle"))
        if kv and rr:
            ratio = rr["ttft_ms"]["p90"] / kv["ttft_ms"]["p90"]
            add("ttft_p90_cut_vs_round_robin", wk, ratio, 3.0, ratio >= 3.0,
                "round-robin TTFT p90 / kv-aware TTFT p90 >= 3")
        if kv and orc:
            ratio = kv["hit_rate"] / orc["hit_rate"] if orc["hit_rate"] else math.nan
            add("hit_rate_vs_oracle", wk, ratio, 0.9, ratio >= 0.9,
                "kv-aware hit rate / oracle hit rate >= 0.9")
    kv, lc = by.get(("3", "kv-aware")), by.get(("3", "least-conn"))
    if kv and lc:
        for q in ("p50", "p90", "p99"):
            ratio = kv["ttft_ms"][q] / lc["ttft_ms"][q]
            add(f"ttft_{q}_vs_least_conn", "3", ratio, 1.05, ratio <= 1.05,
                f"kv-aware TTFT {q} / least-conn TTFT {q} <= 1.05")
        ratio = kv["output_tokens_per_s"] / lc["output_tokens_per_s"]
        add("throughput_vs_least_conn", "3", ratio, 0.95, ratio >= 0.95,
            "kv-aware output tokens/s / least-conn >= 0.95")
    kv, lc = by.get(("4", "kv-aware")), by.get(("4", "least-conn"))
    if kv and lc:
        ratio = kv["ttft_ms"]["p99"] / lc["ttft_ms"]["p99"]
        add("ttft_p99_vs_least_conn", "4", ratio, 1.2, ratio <= 1.2,
            "kv-aware TTFT p99 / least-conn TTFT p99 <= 1.2")
    return out


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| workload | policy | TTFT p50 (ms) | TTFT p90 (ms) | TTFT p99 (ms) | output tok/s "
        "| prefix-cache hit rate | imbalance (max/mean) | engines busy |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in results:
        t = r["ttft_ms"]
        lines.append(
            f"| {WORKLOADS[r['workload']]['title']} | {r['policy']} | {t['p50']:.0f} | "
            f"{t['p90']:.0f} | {t['p99']:.0f} | {r['output_tokens_per_s']:.0f} | "
            f"{r['hit_rate']:.1%} | {r['imbalance']:.2f} | {r['busy_mean']:.0%} |"
        )
    return "\n".join(lines)


def chart(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wks = sorted({r["workload"] for r in results})
    fig, axes = plt.subplots(2, len(wks), figsize=(4.2 * len(wks), 7), squeeze=False)
    colors = {"round-robin": "#9e9e9e", "least-conn": "#64b5f6", "session": "#ffb74d",
              "kv-aware": "#2e7d32", "oracle": "#ce93d8"}
    for j, wk in enumerate(wks):
        rows = [r for r in results if r["workload"] == wk]
        names = [r["policy"] for r in rows]
        c = [colors.get(n, "#333") for n in names]
        ax = axes[0][j]
        ax.bar(range(len(rows)), [r["ttft_ms"]["p90"] for r in rows], color=c)
        ax.set_title(WORKLOADS[wk]["title"], fontsize=10)
        ax.set_ylabel("TTFT p90 (model ms)" if j == 0 else "")
        ax.set_xticks(range(len(rows)), names, rotation=35, ha="right", fontsize=8)
        ax = axes[1][j]
        ax.bar(range(len(rows)), [100 * r["hit_rate"] for r in rows], color=c)
        ax.set_ylim(0, 100)
        ax.set_ylabel("engine prefix-cache hit rate (%)" if j == 0 else "")
        ax.set_xticks(range(len(rows)), names, rotation=35, ha="right", fontsize=8)
    fig.suptitle(f"deepinfer routing: {N_ENGINES} simulated engines, "
                 "TTFT p90 (top, lower is better) and hit rate (bottom)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report_line(wk: str, policy: str, r: dict[str, Any], wall: float, note: str) -> None:
    print(
        f"[{WORKLOADS[wk]['title']:<24} {policy:<11}{note}] n={r['ok']}/{r['requests']} "
        f"ttft p50/p90/p99 {r['ttft_ms']['p50']:.0f}/{r['ttft_ms']['p90']:.0f}/"
        f"{r['ttft_ms']['p99']:.0f} ms  hit {r['hit_rate']:.1%}  "
        f"imb {r['imbalance']:.2f}  busy {r['busy_mean']:.0%}  "
        f"cpu router {r['cpu']['router']:.0%} fleet {r['cpu']['fleet']:.0%} "
        f"gen {r['cpu']['loadgen']:.0%}  routes {r['routes']}  ({wall:.0f}s)",
        flush=True,
    )


def strip_src(argv: list[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a == "--src":
            skip = True
        elif not a.startswith("--src="):
            out.append(a)
    return out


def source_revision() -> str:
    stamp = ROOT / "REVISION"  # written next to an exported tree
    if stamp.exists():
        return stamp.read_text().strip()
    try:
        return subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_sims":
        sims_main(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workloads", default="1,2,3,4")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--quick", action="store_true", help="40%% of each workload's duration")
    ap.add_argument("--speed", type=float, default=SPEED)
    ap.add_argument("--engines", type=int, default=N_ENGINES)
    ap.add_argument("--kv-blocks", type=int, default=KV_BLOCKS)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs per workload and policy (seeds seed, seed+1, ...); TTFT "
                    "percentiles are taken over the pooled samples")
    ap.add_argument("--calibrate", action="store_true",
                    help="least-conn only, print the engines' busy share per workload")
    ap.add_argument("--router-arg", action="append",
                    help="extra deepinfer-router argument (repeatable; for experiments)")
    ap.add_argument("--src", help="measure the router and engines of this source tree "
                    "(default: this checkout)")
    ap.add_argument("--out", default=str(DEFAULT_OUT),
                    help="output path without extension (.json and .png are written)")
    args = ap.parse_args()
    if args.src:
        os.environ["DEEPINFER_BENCH_SRC"] = str(Path(args.src).resolve())
        os.execv(sys.executable, [sys.executable, str(Path(__file__).resolve()),
                                  *strip_src(sys.argv[1:])])
    wks = [w.strip() for w in args.workloads.split(",") if w.strip()]
    policies = ["least-conn"] if args.calibrate else [
        p.strip() for p in args.policies.split(",") if p.strip()]
    for p in policies:
        if p not in POLICIES:
            raise SystemExit(f"unknown policy {p!r}")
    results: list[dict[str, Any]] = []
    for wk in wks:
        runs: dict[str, list[dict[str, Any]]] = {p: [] for p in policies}
        # Repeats interleave the policies (seed 1: every policy, then seed 2, ...) so
        # that drift in the machine's load falls on every policy alike.
        for rep in range(args.repeats):
            for policy in policies:
                t = time.monotonic()
                r = asyncio.run(run_one(wk, policy, args, rep))
                runs[policy].append(r)
                report_line(wk, policy, r, time.monotonic() - t,
                            f" rep {rep + 1}/{args.repeats}" if args.repeats > 1 else "")
        for policy in policies:
            r = merge_repeats(runs[policy])
            results.append(r)
            if args.repeats > 1:
                report_line(wk, policy, r, r["wall_s"], " pooled")
    if args.calibrate:
        return
    tg = targets(results)
    report = {
        "command": "python benchmarks/routing.py " + " ".join(sys.argv[1:]),
        "source": {"dir": str(ROOT), "revision": source_revision()},
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count()},
        "calibration": {
            "engines": args.engines,
            "kv_blocks": args.kv_blocks,
            "block_size": BLOCK_SIZE,
            "kv_tokens_per_engine": args.kv_blocks * BLOCK_SIZE,
            "speed": args.speed,
            "cost_model": "engines/sim defaults: step 6 ms + 40 us/prefill token + 30 us/decode "
                          "seq + 40 ns/context token (8B model, one H100)",
            "time_unit": "model seconds: wall-clock latencies x speed, arrivals / speed",
            "busy_method": "sum of modelled step durations per engine over the arrival "
                           "window / window wall time (engines step while they hold work)",
            "busy_target_least_conn": [0.6, 0.8],
            "least_conn_busy": {r["workload"]: round(r["busy_mean"], 3) for r in results
                                if r["policy"] == "least-conn"},
            "oracle": "load generator asks every engine POST /debug/cached_tokens and sends "
                      "straight to the engine holding the most (ties: fewest in flight); "
                      "bypasses the router; TTFT measured from the send to the engine",
            "quick": args.quick,
            "seed": args.seed,
        },
        "workloads": {k: WORKLOADS[k] for k in wks},
        "results": results,
        "targets": tg,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    chart(results, out.with_suffix(".png"))
    print()
    print(table(results))
    print()
    for tgt in tg:
        print(f"{'PASS' if tgt['met'] else 'FAIL'} workload {tgt['workload']}: {tgt['what']}: "
              f"{tgt['value']}")
    print(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
