"""Routing quality: simulated vLLM engines driven through the real router over HTTP.

For every run a fresh fleet is started (empty KV caches), the router runs as a subprocess
(`deepinfer-router --engine URL... --policy P --log-level warning`), and a seeded load
generator in this process sends streaming chat completions and measures the time to
first token client-side.

Processes (the reference machine has 2 cores):
  - the fleet: one subprocess running the simulated engines (`start_sim_server`) on one
    uvloop event loop (`python benchmarks/routing.py _sims SPEED KV_BLOCKS,...`);
  - the router: one subprocess per run;
  - the load generator: this process (aiohttp).

Time: the engines run `--speed S` times faster than the modelled GPU, so every arrival
time and think time is divided by S and every measured latency is multiplied by S. All
latencies and rates reported are in *model* seconds (what the modelled H100 would see);
the router's own overhead (~1 ms of wall time) is therefore inflated S times, which only
makes the numbers conservative for the policies that serve from cache. So each result
also has TTFT "with the router at 1x" (`ttft_ms_router_1x`): the engines report each
request's modelled queue + prefill time (`--report-engine-ttft`), which stays scaled,
and the rest of the client's TTFT (router, network, load generator) counts at wall-clock
speed. Precise against approximate, where the only difference is router work
(tokenizing), is judged on that figure.

The matrix: every workload (routing_workloads.py: tuning workloads 1-7, held-back H1-H2)
x load level (closed loop one request at a time; open loop ~30% busy; open loop 60-80%
busy) x with/without the `X-Session-ID` header. Per workload and level it runs
round-robin and least-conn (they ignore session keys; session without a key is
least-conn), session and kv-aware with the header, kv-aware without; the oracle (the
load generator asks every engine `POST /debug/cached_tokens` and sends the request
straight to the one holding the most, bypassing the router) only at the high level of
workloads 1 and 2, where a target reads it.

Reported per run: TTFT p50/p90/p99 over all requests and over warm ones (not the first
request of a session or of a shared prefix: those are cold for every policy), the
engines' own prefix-cache hit rate (vllm:prefix_cache_hits_total / queries_total from
their /metrics), load imbalance (max/mean requests per engine), engine busy share (the
modelled duration of every engine step over the arrival window / its wall time), and
the CPU share of the router, fleet and load generator (to show none is the bottleneck).

    python benchmarks/routing.py --repeats 3                  # tuning matrix
    python benchmarks/routing.py --repeats 3 --workloads H1,H2 \
        --out benchmarks/results/routing_held_back            # held-back matrix
    python benchmarks/routing.py --quick --workloads 5 --levels closed --policies session,kv-aware
    python benchmarks/routing.py --calibrate                  # least-conn busy share per level
    python benchmarks/routing.py --markdown RESULT.json...    # the README's tables
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# The router and engine code measured: this checkout, or --src DIR (e.g. an exported
# commit, `git archive HEAD | tar -x -C DIR`, to measure while the tree is being edited).
ROOT = Path(os.environ.get("DEEPINFER_BENCH_SRC") or HERE.parent).resolve()
for _path in (ROOT, HERE):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from routing_workloads import (  # noqa: E402  (benchmarks/ is this script's directory)
    HELD_BACK,
    HELD_BACK_SEEDS,
    LEVELS,
    MODEL,
    TUNING,
    WORKLOADS,
    Plan,
    Session,
    build,
)

POLICIES = ("round-robin", "least-conn", "session", "kv-aware", "oracle")
DEFAULT_OUT = HERE / "results" / "routing"

# --- calibration (fixed before any tuning; recorded in the JSON) ------------------------
# The engine: the simulator's default cost model (8B model on one H100, see
# engines/deepinfer_engine/sim/cost.py) with a KV cache of KV_BLOCKS x 16 tokens, smaller than every
# workload's working set.
N_ENGINES = 4
KV_BLOCKS = 1024  # 16,384 tokens per engine, 65,536 for the fleet of 4
BLOCK_SIZE = 16
SPEED = 5.0
SCALE = 0.3  # share of each workload's duration run in the matrix (time budget)
QUICK_SCALE = 0.2


# --- the fleet subprocess -----------------------------------------------------------------
def sims_main(argv: Sequence[str]) -> None:
    """`routing.py _sims SPEED KV_BLOCKS[,KV_BLOCKS...] [REGISTRY TOKENIZER_DIR]`: run one
    simulated engine per KV_BLOCKS entry on one event loop. With a tokenizer directory the
    engines tokenize with it and publish vLLM's KV events on loopback ports; with a
    registry URL ("-": none) they register there. Prints {"urls": [...]} once; then each
    "mark" line on stdin is answered with one JSON line {"t": wall, "busy": [modelled
    busy wall-seconds per engine, cumulative]}."""
    import logging

    import uvloop

    from deepinfer_engine.sim.server import start_sim_server
    from deepinfer_engine.sim.settings import SimSettings

    speed = float(argv[0])
    blocks = [int(b) for b in argv[1].split(",")]
    registry = argv[2] if len(argv) > 2 and argv[2] != "-" else None
    tokenizer = argv[3] if len(argv) > 3 and argv[3] != "-" else None
    n = len(blocks)
    logging.basicConfig(level=logging.WARNING)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        sims = []
        busy = [0.0] * n
        for i, kv_blocks in enumerate(blocks):
            events = kv_events_config() if tokenizer else None
            settings = SimSettings(model=MODEL, kv_blocks=kv_blocks, block_size=BLOCK_SIZE,
                                   speed=speed, seed=i, log_level="warning",
                                   registry=registry, heartbeat_s=1.0,
                                   tokenizer=tokenizer, kv_events_config=events,
                                   report_engine_ttft=True)
            sim = await start_sim_server(settings, "127.0.0.1", 0,
                                         register=registry is not None)
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


@dataclass(frozen=True)
class BpeTokenizer:
    """The byte-level BPE tokenizer the end-to-end tests' tiny model uses (trained here,
    in seconds), as a Hugging Face directory, and its one-token words: the workloads'
    text is drawn from those, so a word costs one token as with the stand-in tokenizer."""

    path: Path
    words: tuple[str, ...]

    @classmethod
    def build(cls, out: Path) -> BpeTokenizer:
        from tests.e2e.tiny_model import build_tokenizer

        build_tokenizer(out)
        vocab = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]
        # "Ġ" is byte-level BPE's space: " word" pieces of lowercase ASCII letters.
        words = sorted(" " + k[1:] for k in vocab
                       if k.startswith("Ġ") and k[1:].isascii() and k[1:].isalpha()
                       and k[1:].islower())
        return cls(out, tuple(words))


def kv_events_config() -> str:
    """vLLM's --kv-events-config for one engine, on free loopback ports."""
    return json.dumps({"enable_kv_cache_events": True, "publisher": "zmq",
                       "endpoint": f"tcp://127.0.0.1:{free_port()}",
                       "replay_endpoint": f"tcp://127.0.0.1:{free_port()}", "topic": "kv"})


class Fleet:
    """The simulated engines (one subprocess), one per entry of `kv_blocks`; with a
    tokenizer directory they tokenize with it and publish KV events, with a registry
    URL they register there."""

    def __init__(self, kv_blocks: Sequence[int], speed: float, registry: str | None = None,
                 tokenizer: str | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "_sims", str(speed),
             ",".join(str(b) for b in kv_blocks), registry or "-", tokenizer or "-"],
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
    def __init__(self, urls: Sequence[str], policy: str, extra: Sequence[str] = (),
                 command: Callable[[Sequence[str], int], list[str]] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if command is not None:  # another router (benchmarks/peers.py): its own argv
            cmd = command(urls, self.port)
        else:  # deepinfer-router, from the source tree measured (ROOT)
            cmd = [sys.executable, "-c",
                   "import sys; from deepinfer_router.cli import main; sys.exit(main())"]
            for u in urls:  # none: engines register in the router's embedded registry
                cmd += ["--engine", u]
            cmd += ["--policy", policy, "--host", "127.0.0.1", "--port", str(self.port),
                    "--log-level", "warning", *extra]
        self.cmd = cmd
        # a peer's log (its warnings about endpoints vLLM lacks) would bury the report
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=src_env(), start_new_session=True,
                                     stdout=subprocess.DEVNULL if command else None,
                                     stderr=subprocess.DEVNULL if command else None)

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
    warm: bool = False
    ttft: float = math.nan  # wall seconds
    engine_ttft: float = math.nan  # the engine's modelled queue + prefill, model seconds
    e2e: float = math.nan
    out_tokens: int = 0
    engine: str = ""
    route: str = ""
    worker: str = ""  # x-deepinfer-worker: which of --workers answered
    text: str = ""


@dataclass
class Gen:
    speed: float
    session: Any
    router_url: str | None  # None: oracle (straight to engines)
    engine_urls: list[str]
    engine_ids: list[str]
    with_session: bool = True  # send X-Session-ID
    inflight: dict[str, int] = field(default_factory=dict)
    results: list[Result] = field(default_factory=list)
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

    async def send(self, body: dict[str, Any], kind: str, session_id: str | None = None,
                   turn: int = 0, warm: bool = False) -> Result:
        import orjson

        body = dict(body, stream=True, stream_options={"include_usage": True})
        headers = {"Content-Type": "application/json"}
        if session_id is not None and self.with_session:
            headers["X-Session-ID"] = session_id
        if self.router_url is None:
            idx = await self.oracle_pick(body)
            url, eid, route = self.engine_urls[idx], self.engine_ids[idx], "oracle"
        else:
            url, eid, route = self.router_url, "", ""
        res = Result(kind, False, warm)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        if eid:
            self.inflight[eid] = self.inflight.get(eid, 0) + 1
        pieces: list[str] = []
        try:
            async with self.session.post(url + "/v1/chat/completions", data=orjson.dumps(body),
                                         headers=headers) as r:
                res.engine = r.headers.get("x-deepinfer-engine", eid)
                res.route = r.headers.get("x-deepinfer-route", route)
                res.worker = r.headers.get("x-deepinfer-worker", "")
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
                        timing = event.get("x_sim_timing") or {}
                        res.engine_ttft = float(timing.get("engine_ttft_s", math.nan))
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


class Conversation:
    """The messages of one session as its turns are answered."""

    def __init__(self, session: Session) -> None:
        self.s = session
        self.history: list[dict[str, str]] = list(session.prefix)

    def body(self, k: int) -> dict[str, Any]:
        s = self.s
        base = s.prefix if s.fresh else self.history
        msgs = [*base, {"role": "user", "content": s.turns[k].user}]
        return {"model": MODEL, "messages": msgs, "max_tokens": s.max_tokens}

    def answered(self, k: int, text: str) -> None:
        if not self.s.fresh:
            self.history += [{"role": "user", "content": self.s.turns[k].user},
                             {"role": "assistant", "content": text}]

    async def turn(self, gen: Gen, k: int) -> Result:
        s = self.s
        res = await gen.send(self.body(k), s.kind, s.id, k, s.turns[k].warm)
        if res.ok:
            self.answered(k, res.text)
        return res


async def drive_open(gen: Gen, plan: Plan) -> None:
    """Sessions start at their arrival times; each sends its turns in order, with the
    think time between an answer and the next turn (a failed turn ends its session)."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()

    async def converse(s: Session) -> None:
        await asyncio.sleep(max(0.0, t0 + s.at / gen.speed - loop.time()))
        conv = Conversation(s)
        for k, turn in enumerate(s.turns):
            if not (await conv.turn(gen, k)).ok:
                return
            if k + 1 < len(s.turns):
                await asyncio.sleep(turn.think_s / gen.speed)

    tasks = [asyncio.create_task(converse(s)) for s in plan.sessions]
    gen.t_last = t0 + max((s.at for s in plan.sessions), default=0.0) / gen.speed
    await asyncio.gather(*tasks)


async def drive_closed(gen: Gen, plan: Plan) -> None:
    """One request at a time, in the plan's shuffled interleaving of sessions' turns."""
    convs = [Conversation(s) for s in plan.sessions]
    for i, k in plan.closed_order:
        await convs[i].turn(gen, k)
    gen.t_last = asyncio.get_running_loop().time()


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


async def wait_listening(session: Any, url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            async with session.get(url + "/health") as r:
                if r.status == 200:
                    return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"router at {url} not listening")


async def wait_serving(session: Any, url: str, timeout: float = 60.0) -> None:
    """A peer router (no /ready): until it lists a model, i.e. has taken its workers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            async with session.get(url + "/v1/models") as r:
                if r.status == 200 and json.loads(await r.read()).get("data"):
                    return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"router at {url} does not list a model")


async def wait_precise(session: Any, url: str, n: int, timeout: float = 60.0) -> None:
    """Until the router follows `n` engines' KV event feeds and has verified their
    tokenizer (chat prompts route on the precise index from then on)."""
    deadline = time.monotonic() + timeout
    detail: dict[str, Any] = {}
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            async with session.get(url + "/ready") as r:
                detail = await r.json()
                feeds = detail["kv_event_feeds"]
                if (len(feeds) >= n and all(v == "live" for v in feeds.values())
                        and detail["prompt_tokenizers"].get(MODEL) == "verified"):
                    return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"router at {url} not routing precisely: {detail}")


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return math.nan
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo = math.floor(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


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

def seed_for(wkey: str, args: argparse.Namespace, rep: int) -> int:
    """Tuning workloads: (--seed + repeat) x 1000 + workload; held-back: frozen seeds."""
    if wkey in HELD_BACK:
        return HELD_BACK_SEEDS[rep % len(HELD_BACK_SEEDS)]
    return (args.seed + rep) * 1000 + int(wkey)


def real_router_ttft(r: Result, speed: float) -> float:
    """TTFT in model ms with the engine's modelled queue + prefill sped up as everywhere
    else, but the rest (router, network, load generator: real work, not modelled) at
    wall-clock speed instead of `speed` times it."""
    engine_wall = r.engine_ttft / speed
    return (r.engine_ttft + max(r.ttft - engine_wall, 0.0)) * 1000


def percentiles(xs: list[float]) -> dict[str, float]:
    return {"p50": pct(xs, 0.5), "p90": pct(xs, 0.9), "p99": pct(xs, 0.99), "n": len(xs)}


async def run_one(wkey: str, level: str, policy: str, with_session: bool,
                  args: argparse.Namespace, rep: int = 0, index: str = "approximate",
                  peer: Callable[[Sequence[str], int], list[str]] | None = None
                  ) -> dict[str, Any]:
    """One run; with `peer` (argv for engine URLs and a port) that router instead of
    deepinfer-router, on the static stand-in fleet (`policy` is then only its label)."""
    import aiohttp

    from deepinfer_router.shared.engine_record import engine_id_for

    seed = seed_for(wkey, args, rep)
    bpe: BpeTokenizer | None = args.bpe
    plan = build(wkey, level, seed, QUICK_SCALE if args.quick else SCALE,
                 bpe.words if bpe else None)
    kv_blocks = plan.kv_blocks or [args.kv_blocks] * args.engines
    speed = args.speed
    fleet: Fleet | None = None
    router: Router | None = None
    try:
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            extra = list(args.router_arg or ())
            if bpe is None:  # static engines, stand-in tokenizer, no KV events
                fleet = Fleet(kv_blocks, speed)
                if policy != "oracle":
                    router = Router(fleet.urls, policy, extra, command=peer)
            elif policy == "oracle":
                fleet = Fleet(kv_blocks, speed, tokenizer=str(bpe.path))
            else:
                # The engines register in the router's embedded registry (that is how it
                # learns their KV event endpoints and tokenizer); every run but the
                # precise one ignores the feeds (no subscription costs CPU there).
                if index != "precise":
                    extra += ["--kv-events", "off"]
                router = Router([], policy, extra)
                await wait_listening(session, router.url)
                fleet = Fleet(kv_blocks, speed, registry=router.url, tokenizer=str(bpe.path))
            ids = [engine_id_for(u) for u in fleet.urls]
            if router is not None and peer is not None:
                await wait_serving(session, router.url)
            elif router is not None:
                await wait_ready(session, router.url, len(kv_blocks))
                if index == "precise":
                    await wait_precise(session, router.url, len(kv_blocks))
            gen = Gen(speed, session, router.url if router else None, fleet.urls, ids,
                      with_session=with_session)
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
            n_offered = sum(len(s.turns) for s in plan.sessions)
            await (drive_closed(gen, plan) if level == "closed" else drive_open(gen, plan))
            await marker
            wall_total = time.monotonic() - wall0
            metrics = []
            for u in fleet.urls:
                async with session.get(u + "/metrics") as resp:
                    metrics.append(parse_metrics(await resp.text()))
    finally:
        if fleet is not None:  # first: the engines deregister from the router
            fleet.close()
        if router is not None:
            router.close()

    window = max(mark1["t"] - mark0["t"], 1e-9)
    busy = [(b1 - b0) / window for b0, b1 in zip(mark0["busy"], mark1["busy"], strict=True)]
    res = gen.results
    ok = [r for r in res if r.ok]
    ttft = [r.ttft * speed * 1000 for r in ok]  # model ms
    warm = [r.ttft * speed * 1000 for r in ok if r.warm]
    # The same with only the engine's modelled time sped up: the router's, the network's
    # and the load generator's own time counted at wall-clock speed (as in production).
    at_1x = [real_router_ttft(r, speed) for r in ok if not math.isnan(r.engine_ttft)]
    warm_1x = [real_router_ttft(r, speed) for r in ok
               if r.warm and not math.isnan(r.engine_ttft)]
    hits = sum(m.get("vllm:prefix_cache_hits_total", 0.0) for m in metrics)
    queries = sum(m.get("vllm:prefix_cache_queries_total", 0.0) for m in metrics)
    per_engine = {eid: 0 for eid in ids}
    for r in ok:
        per_engine[r.engine] = per_engine.get(r.engine, 0) + 1
    counts = list(per_engine.values())
    if peer is not None:  # a peer names no engine: the engines' own request counters
        counts = [int(m.get("vllm:request_success_total", 0.0)) for m in metrics]
    routes: dict[str, int] = {}
    for r in res:
        routes[r.route] = routes.get(r.route, 0) + 1
    out_tokens = sum(r.out_tokens for r in ok)
    model_makespan = wall_total * speed
    return {
        "workload": wkey,
        "level": level,
        "policy": policy,
        "session_header": with_session,
        "index": index if policy == "kv-aware" else "-",
        "fleet": "bpe+kv-events" if bpe else "stand-in",
        "requests": len(res),
        "offered": n_offered,
        "ok": len(ok),
        "errors": len(res) - len(ok),
        "ttft_ms": percentiles(ttft),
        "ttft_ms_warm": percentiles(warm),
        "ttft_ms_router_1x": percentiles(at_1x),
        "ttft_ms_warm_router_1x": percentiles(warm_1x),
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
        "preemptions": sum(m.get("vllm:num_preemptions_total", 0.0) for m in metrics),
        "seed": seed,
        # Raw samples for pooling repeats (merge_repeats); not written to the JSON.
        "_ttft": ttft,
        "_ttft_warm": warm,
        "_ttft_1x": at_1x,
        "_ttft_warm_1x": warm_1x,
        "_out_tokens": out_tokens,
        "_model_makespan": model_makespan,
    }


def merge_repeats(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from repeats of a run with different seeds: TTFT percentiles over the
    pooled samples (a p99 over one run rests on few samples and moves between seeds),
    counters summed, shares averaged; each repeat's own figures stay under "repeats"."""
    first = runs[0]
    if len(runs) == 1:
        merged = dict(first)
    else:
        ttft = [x for r in runs for x in r["_ttft"]]
        warm = [x for r in runs for x in r["_ttft_warm"]]
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
            "ttft_ms_router_1x": percentiles([x for r in runs for x in r["_ttft_1x"]]),
            "ttft_ms_warm_router_1x": percentiles([x for r in runs for x in r["_ttft_warm_1x"]]),
            "requests": sum(r["requests"] for r in runs),
            "offered": sum(r["offered"] for r in runs),
            "ok": sum(r["ok"] for r in runs),
            "errors": sum(r["errors"] for r in runs),
            "ttft_ms": percentiles(ttft),
            "ttft_ms_warm": percentiles(warm),
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
                         "warm_p90": round(r["ttft_ms_warm"]["p90"], 1),
                         "hit_rate": round(r["hit_rate"], 4)} for r in runs],
        })
    return {k: v for k, v in merged.items() if not k.startswith("_")}


# --- the matrix -----------------------------------------------------------------------------
# Per workload and level: the baselines once (round-robin and least-conn ignore session
# keys; session without a key is least-conn, the same code path), session and kv-aware
# with the session header, kv-aware without. The oracle only where a target reads it.
RUNS: tuple[tuple[str, bool], ...] = (
    ("round-robin", False), ("least-conn", False), ("session", True),
    ("kv-aware", True), ("kv-aware", False),
)
ORACLE_CELLS = {("1", "high"), ("2", "high")}
INDEXES = ("approximate", "precise")
Run = tuple[str, bool, str]  # policy, session header, index (kv-aware's; "-" otherwise)


def runs_for(wkey: str, level: str, policies: Sequence[str], indexes: Sequence[str] = (
        "approximate",), oracle_everywhere: bool = False) -> list[Run]:
    """kv-aware once per index; the oracle where a target reads it (every cell when the
    precise index is measured: its target reads the oracle wherever it is meaningful)."""
    out: list[Run] = []
    for policy, hdr in RUNS:
        if policy not in policies:
            continue
        out += [(policy, hdr, ix) for ix in indexes] if policy == "kv-aware" else [
            (policy, hdr, "-")]
    if "oracle" in policies and (oracle_everywhere or (wkey, level) in ORACLE_CELLS):
        out.append(("oracle", False, "-"))
    return out


def label(policy: str, with_session: bool, index: str = "-") -> str:
    if policy in ("session", "kv-aware"):
        tail = f", {index}" if index == "precise" else ""
        return f"{policy} ({'header' if with_session else 'no header'}{tail})"
    return policy


def compare(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The targets of issue 13 per (workload, level, with/without session header), and
    the original workload 1-4 targets at the high level (kv-aware on the approximate
    index), then precise against approximate."""
    by = {(r["workload"], r["level"], r["policy"], r["session_header"]): r for r in results
          if r.get("index", "-") != "precise"}
    out: list[dict[str, Any]] = []

    def add(name: str, cell: str, value: float, limit: float, ok: bool, what: str) -> None:
        out.append({"target": name, "cell": cell, "value": round(value, 3), "limit": limit,
                    "met": bool(ok), "what": what})

    for wkey, level in sorted({(r["workload"], r["level"]) for r in results}):
        for hdr in (True, False):
            kv = by.get((wkey, level, "kv-aware", hdr))
            base = [by.get((wkey, level, "round-robin", False)),
                    by.get((wkey, level, "least-conn", False)),
                    by.get((wkey, level, "session", True)) if hdr else None]
            simple = [b for b in base if b is not None]
            if kv is None or not simple:
                continue
            cell = f"{wkey}/{level}/{'header' if hdr else 'no header'}"
            best_hit = max(b["hit_rate"] for b in simple)
            if best_hit > 0.01:
                ratio = kv["hit_rate"] / best_hit
                add("hit_rate_vs_best_simple", cell, ratio, 0.97, ratio >= 0.97,
                    "kv-aware hit rate / best simple policy's >= 0.97")
            for key, what in (("ttft_ms", "all"), ("ttft_ms_warm", "warm")):
                best = min(b[key]["p90"] for b in simple)
                if kv[key]["n"] and best > 0:
                    ratio = kv[key]["p90"] / best
                    add(f"ttft_p90_{what}_vs_best_simple", cell, ratio, 1.05, ratio <= 1.05,
                        f"kv-aware TTFT p90 ({what}) / best simple policy's <= 1.05")
            rr = by.get((wkey, level, "round-robin", False))
            if level == "high" and wkey != "3" and rr is not None and kv["ttft_ms"]["p90"] > 0:
                ratio = rr["ttft_ms"]["p90"] / kv["ttft_ms"]["p90"]
                add("ttft_p90_cut_vs_round_robin", cell, ratio, 2.0, ratio >= 2.0,
                    "round-robin TTFT p90 / kv-aware TTFT p90 >= 2 (high load, reuse)")
    out += original_targets(by)
    out += index_targets(results)
    return out


def index_targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Precise against approximate kv-aware per (workload, level, header): hit rate
    >= 0.97x and TTFT p90 <= 1.03x; precise's hit rate >= 0.95x the oracle's where the
    oracle's is meaningful (it routes on cached tokens alone, so under load it can lose to
    a policy that balances: read only where its hit rate is the cell's best)."""
    kv = {(r["workload"], r["level"], r["session_header"], r["index"]): r for r in results
          if r["policy"] == "kv-aware"}
    oracle = {(r["workload"], r["level"]): r for r in results if r["policy"] == "oracle"}
    out: list[dict[str, Any]] = []

    def add(name: str, cell: str, value: float, limit: float, ok: bool, what: str) -> None:
        out.append({"target": name, "cell": cell, "value": round(value, 3), "limit": limit,
                    "met": bool(ok), "what": what})

    for (wkey, level, hdr, index), precise in sorted(kv.items()):
        approx = kv.get((wkey, level, hdr, "approximate"))
        if index != "precise" or approx is None:
            continue
        cell = f"{wkey}/{level}/{'header' if hdr else 'no header'}"
        if approx["hit_rate"] > 0.01:
            ratio = precise["hit_rate"] / approx["hit_rate"]
            add("precise_hit_rate_vs_approximate", cell, ratio, 0.97, ratio >= 0.97,
                "precise hit rate / approximate >= 0.97")
        # The two runs differ only in router work, which the as-measured TTFT multiplies
        # by the speed: the target reads TTFT with the router at wall-clock speed.
        key = "ttft_ms_router_1x"
        if approx.get(key, {}).get("n") and approx[key]["p90"] > 0:
            ratio = precise[key]["p90"] / approx[key]["p90"]
            add("precise_ttft_p90_vs_approximate", cell, ratio, 1.03, ratio <= 1.03,
                "precise TTFT p90 / approximate <= 1.03 (router at 1x)")
        orc = oracle.get((wkey, level))
        if orc and orc["hit_rate"] > 0.01 and orc["hit_rate"] >= approx["hit_rate"]:
            ratio = precise["hit_rate"] / orc["hit_rate"]
            add("precise_hit_rate_vs_oracle", cell, ratio, 0.95, ratio >= 0.95,
                "precise hit rate / oracle >= 0.95")
    return out


def original_targets(by: dict[tuple[str, str, str, bool], dict[str, Any]]) -> list[dict[str, Any]]:
    """Workloads 1-4 at the high level, kv-aware with the session header."""
    out: list[dict[str, Any]] = []

    def add(name: str, wk: str, value: float, limit: float, ok: bool, what: str) -> None:
        out.append({"target": name, "cell": f"{wk}/high/header", "value": round(value, 3),
                    "limit": limit, "met": bool(ok), "what": what})

    def get(wk: str, policy: str) -> dict[str, Any] | None:
        return by.get((wk, "high", policy, policy == "kv-aware"))

    for wk in ("1", "2"):
        kv, rr, orc = get(wk, "kv-aware"), get(wk, "round-robin"), get(wk, "oracle")
        if kv and rr:
            ratio = rr["ttft_ms"]["p90"] / kv["ttft_ms"]["p90"]
            add("ttft_p90_cut_vs_round_robin_3x", wk, ratio, 3.0, ratio >= 3.0,
                "round-robin TTFT p90 / kv-aware TTFT p90 >= 3")
        if kv and orc and orc["hit_rate"]:
            ratio = kv["hit_rate"] / orc["hit_rate"]
            add("hit_rate_vs_oracle", wk, ratio, 0.9, ratio >= 0.9,
                "kv-aware hit rate / oracle hit rate >= 0.9")
    kv, lc = get("3", "kv-aware"), get("3", "least-conn")
    if kv and lc:
        for q in ("p50", "p90", "p99"):
            ratio = kv["ttft_ms"][q] / lc["ttft_ms"][q]
            add(f"ttft_{q}_vs_least_conn", "3", ratio, 1.05, ratio <= 1.05,
                f"kv-aware TTFT {q} / least-conn TTFT {q} <= 1.05")
        ratio = kv["output_tokens_per_s"] / lc["output_tokens_per_s"]
        add("throughput_vs_least_conn", "3", ratio, 0.95, ratio >= 0.95,
            "kv-aware output tokens/s / least-conn >= 0.95")
    kv, lc = get("4", "kv-aware"), get("4", "least-conn")
    if kv and lc:
        ratio = kv["ttft_ms"]["p99"] / lc["ttft_ms"]["p99"]
        add("ttft_p99_vs_least_conn", "4", ratio, 1.2, ratio <= 1.2,
            "kv-aware TTFT p99 / least-conn TTFT p99 <= 1.2")
    return out


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| workload | load | policy | TTFT p50 | p90 | p99 | warm p90 | warm p99 "
        "| hit rate | imbalance | busy |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in results:
        t, w = r["ttft_ms"], r["ttft_ms_warm"]
        lines.append(
            f"| {WORKLOADS[r['workload']]['title']} | {r['level']} "
            f"| {label(r['policy'], r['session_header'], r.get('index', '-'))} "
            f"| {t['p50']:.0f} | {t['p90']:.0f} "
            f"| {t['p99']:.0f} | {w['p90']:.0f} | {w['p99']:.0f} | {r['hit_rate']:.1%} "
            f"| {r['imbalance']:.2f} | {r['busy_mean']:.0%} |"
        )
    return "\n".join(lines)


def index_table(results: list[dict[str, Any]]) -> str:
    """kv-aware on the approximate and the precise index side by side (and the oracle's
    hit rate where it ran), per workload, level and session header."""
    kv = {(r["workload"], r["level"], r["session_header"], r["index"]): r for r in results
          if r["policy"] == "kv-aware"}
    oracle = {(r["workload"], r["level"]): r for r in results if r["policy"] == "oracle"}
    lines = [
        "| workload | load | header | hit rate approx. | precise | TTFT p90 approx. "
        "| precise | TTFT p90, router at 1x, approx. | precise | warm p90 (1x) approx. "
        "| precise | oracle hit rate |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for (wkey, level, hdr, index), p in kv.items():
        a = kv.get((wkey, level, hdr, "approximate"))
        if index != "precise" or a is None:
            continue
        orc = oracle.get((wkey, level))
        orc_hit = f"{orc['hit_rate']:.1%}" if orc else "-"
        lines.append(
            f"| {WORKLOADS[wkey]['title']} | {level} | {'yes' if hdr else 'no'} "
            f"| {a['hit_rate']:.1%} | {p['hit_rate']:.1%} | {a['ttft_ms']['p90']:.0f} "
            f"| {p['ttft_ms']['p90']:.0f} | {a['ttft_ms_router_1x']['p90']:.0f} "
            f"| {p['ttft_ms_router_1x']['p90']:.0f} "
            f"| {a['ttft_ms_warm_router_1x']['p90']:.0f} "
            f"| {p['ttft_ms_warm_router_1x']['p90']:.0f} | {orc_hit} |"
        )
    return "\n".join(lines)


def report_line(r: dict[str, Any], wall: float, note: str) -> None:
    t, w = r["ttft_ms"], r["ttft_ms_warm"]
    print(
        f"[{WORKLOADS[r['workload']]['title']:<26} {r['level']:<6} "
        f"{label(r['policy'], r['session_header'], r.get('index', '-')):<21}{note}] "
        f"n={r['ok']}/{r['requests']} "
        f"ttft {t['p50']:.0f}/{t['p90']:.0f}/{t['p99']:.0f} warm p90 {w['p90']:.0f} ms  "
        f"hit {r['hit_rate']:.1%}  imb {r['imbalance']:.2f}  busy {r['busy_mean']:.0%}  "
        f"cpu router {r['cpu']['router']:.0%} fleet {r['cpu']['fleet']:.0%} "
        f"gen {r['cpu']['loadgen']:.0%}  routes {r['routes']}  ({wall:.0f}s)",
        flush=True,
    )


def print_targets(tg: list[dict[str, Any]]) -> None:
    for t in tg:
        print(f"{'PASS' if t['met'] else 'FAIL'} {t['cell']}: {t['what']}: {t['value']}")
    met = sum(t["met"] for t in tg)
    print(f"{met}/{len(tg)} targets met")


def markdown(paths: Sequence[str]) -> str:
    """The README's routing tables from result JSONs: per file, its command, the table
    and the targets missed (with the count met)."""
    out: list[str] = []
    for path in paths:
        report = json.loads(Path(path).read_text())
        results, tg = report["results"], report["targets"]
        missed = [t for t in tg if not t["met"]]
        precise = any(r.get("index") == "precise" for r in results)
        out += [f"`{report['command']}` ({report['source']['revision']}, "
                f"{report['wall_s'] / 60:.0f} min):", "",
                index_table(results) if precise else table(results), "",
                f"Targets met: {len(tg) - len(missed)} of {len(tg)}."
                + (" Missed:" if missed else ""), ""]
        out += [f"- {t['cell']}: {t['what']}: **{t['value']}**" for t in missed]
        out.append("")
    return "\n".join(out)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_sims":
        sims_main(sys.argv[2:])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--markdown":
        print(markdown(sys.argv[2:]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workloads", default=",".join(TUNING),
                    help=f"tuning: {','.join(TUNING)}; held back: {','.join(HELD_BACK)}")
    ap.add_argument("--levels", default=",".join(LEVELS))
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--quick", action="store_true",
                    help=f"{QUICK_SCALE * 100:.0f}%% of each workload's duration "
                    f"instead of {SCALE * 100:.0f}%%")
    ap.add_argument("--speed", type=float, default=SPEED)
    ap.add_argument("--engines", type=int, default=N_ENGINES)
    ap.add_argument("--kv-blocks", type=int, default=KV_BLOCKS)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs per cell (seeds seed, seed+1, ...; held-back workloads use "
                    "their frozen seeds); TTFT percentiles over the pooled samples")
    ap.add_argument("--indexes", default="approximate",
                    help="kv-aware's prefix index: approximate, precise or both "
                    "(approximate,precise). With precise, every run of the invocation uses "
                    "engines that tokenize with a real BPE tokenizer and publish KV events, "
                    "registered in the router's embedded registry (the approximate run "
                    "passes --kv-events off), and the oracle runs in every cell")
    ap.add_argument("--calibrate", action="store_true",
                    help="least-conn only: the engines' busy share per workload and level")
    ap.add_argument("--router-arg", action="append",
                    help="extra deepinfer-router argument (repeatable; for experiments)")
    ap.add_argument("--src", help="measure the router and engines of this source tree "
                    "(default: this checkout)")
    ap.add_argument("--out", default=str(DEFAULT_OUT),
                    help="output path without extension (.json is written)")
    args = ap.parse_args()
    if args.src:
        os.environ["DEEPINFER_BENCH_SRC"] = str(Path(args.src).resolve())
        os.execv(sys.executable, [sys.executable, str(Path(__file__).resolve()),
                                  *strip_src(sys.argv[1:])])
    wks = [w.strip() for w in args.workloads.split(",") if w.strip()]
    levels = [lv.strip() for lv in args.levels.split(",") if lv.strip()]
    policies = ["least-conn"] if args.calibrate else [
        p.strip() for p in args.policies.split(",") if p.strip()]
    indexes = [x.strip() for x in args.indexes.split(",") if x.strip()]
    for name, given, known in (("workload", wks, WORKLOADS), ("level", levels, LEVELS),
                               ("policy", policies, POLICIES), ("index", indexes, INDEXES)):
        for g in given:
            if g not in known:
                raise SystemExit(f"unknown {name} {g!r}")
    results: list[dict[str, Any]] = []
    started = time.monotonic()
    tokenizer_tmp = tempfile.TemporaryDirectory(prefix="routing-bpe-")
    args.bpe = BpeTokenizer.build(Path(tokenizer_tmp.name)) if "precise" in indexes else None
    for wk in wks:
        for level in levels:
            runs = runs_for(wk, level, policies, indexes, oracle_everywhere=bool(args.bpe))
            done: dict[Run, list[dict[str, Any]]] = {r: [] for r in runs}
            # Repeats interleave the policies (seed 1: every policy, then seed 2, ...) so
            # that drift in the machine's load falls on every policy alike.
            for rep in range(args.repeats):
                for policy, hdr, index in runs:
                    t = time.monotonic()
                    r = asyncio.run(run_one(wk, level, policy, hdr, args, rep, index))
                    done[(policy, hdr, index)].append(r)
                    report_line(r, time.monotonic() - t,
                                f" rep {rep + 1}/{args.repeats}" if args.repeats > 1 else "")
            for key in runs:
                r = merge_repeats(done[key])
                results.append(r)
                if args.repeats > 1:
                    report_line(r, r["wall_s"], " pooled")
    tokenizer_tmp.cleanup()
    if args.calibrate:
        return
    tg = compare(results)
    report = {
        "command": "python benchmarks/routing.py " + " ".join(sys.argv[1:]),
        "source": {"dir": str(ROOT), "revision": source_revision()},
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count()},
        "wall_s": time.monotonic() - started,
        "calibration": {
            "engines": args.engines,
            "kv_blocks": args.kv_blocks,
            "block_size": BLOCK_SIZE,
            "kv_tokens_per_engine": args.kv_blocks * BLOCK_SIZE,
            "speed": args.speed,
            "scale": QUICK_SCALE if args.quick else SCALE,
            "cost_model": "deepinfer_engine/sim defaults: step 6 ms + 40 us/prefill token + 30 us/"
                          "decode seq + 40 ns/context token (8B model, one H100)",
            "time_unit": "model seconds: wall-clock latencies x speed, arrivals / speed",
            "busy_method": "sum of modelled step durations per engine over the arrival "
                           "window / window wall time (engines step while they hold work)",
            "busy_target_least_conn": {"low": 0.3, "high": [0.6, 0.8]},
            "oracle": "load generator asks every engine POST /debug/cached_tokens and sends "
                      "straight to the engine holding the most (ties: fewest in flight); "
                      "bypasses the router; TTFT measured from the send to the engine",
            "quick": args.quick,
            "indexes": indexes,
            "fleet": ("engines tokenize with the tiny model's byte-level BPE tokenizer "
                      f"({len(args.bpe.words)} one-token words draw the text), publish KV "
                      "events and register in the router's embedded registry")
            if args.bpe else "static --engine URLs, the simulator's stand-in tokenizer",
            "seed": args.seed,
            "held_back_seeds": list(HELD_BACK_SEEDS),
        },
        "workloads": {k: WORKLOADS[k] for k in wks},
        "results": results,
        "targets": tg,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    tuning = [r for r in results if r["workload"] in TUNING]
    held = [r for r in results if r["workload"] in HELD_BACK]
    for title, rows in (("tuning workloads", tuning), ("held-back workloads", held)):
        if rows:
            print(f"\n{title}\n\n{table(rows)}\n")
            if args.bpe:
                print(f"{index_table(rows)}\n")
    print_targets(tg)
    print(f"\nwrote {out.with_suffix('.json')} in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
