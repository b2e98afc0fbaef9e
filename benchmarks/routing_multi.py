"""Several routers, one fleet: do two kv-aware routers sharing hints through Redis route
as well as one router?

Workload 1 of benchmarks/routing.py (multi-round chat: a shared ~1,000-token system
prompt, each user's history growing over 10 rounds, think time between rounds) is sent
to the same kind of simulated fleet (4 engines, 16,384 KV tokens each) in three setups,
each on a fresh fleet (empty caches):

  one        one router, `--engine URL...` (static engines, as routing.py runs it)
  two        two routers `--redis-url redis://127.0.0.1:P --policy kv-aware` on a real
             redis-server; the engines are registered in Redis (RedisRegistrar, one per
             sim, run by this process); the routers share placements (`--share-hints`,
             the default)
  two-noshare  the same with `--no-share-hints`: each router knows only what it routed
  workers-N  one router with `--workers N` (static engines, no Redis: the workers share
             placements and in-flight counts between themselves), every request on a
             fresh connection (keep-alive would pin a client to one worker); reports the
             share of turns that reached another worker than the user's previous turn.
             Target: hit rate >= 0.97x one router's.

The load is split between the two routers (`--split`):
  alternate  (default, the hard case) a user's turns alternate between router A and B:
             every next turn of a conversation arrives at the router that did not see
             the previous one;
  random     each request goes to A or B at random (seeded);
  sticky     each user keeps one router (half the users on each).

With `--indexes approximate,precise` every setup runs once per index of kv-aware, on
engines that tokenize with a real byte-level BPE tokenizer and publish vLLM's KV events
(as routing.py --indexes): the engines register themselves in Redis (every setup, "one"
included, so the routers learn their event feeds and tokenizer), the approximate runs
pass --kv-events off. The routers of "two-noshare" then know nothing of each other's
placements, as routers from different teams in front of one fleet: the precise index
sees what every router sent. Targets there: precise hit rate >= 1.1x approximate's for
two-noshare, and two-noshare precise >= 0.95x one router precise.

Reported per setup: the engines' own prefix-cache hit rate (deltas of
vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total over the run, summed over
the engines), TTFT p50/p90/p99 in model ms (see routing.py: wall latency x speed),
"stickiness" (share of turns 2..n served by the engine of the same user's previous
turn), the routes the routers gave, and for the Redis setups the hints published on the
stream. Target: hit rate(two) / hit rate(one) >= 0.9.

    python benchmarks/routing_multi.py [--quick] [--split alternate[,random,sticky]]
                                       [--setups one,two,two-noshare] [--seed 1]
                                       [--indexes approximate,precise]

Writes benchmarks/results/routing_multi.json (or --out) and prints a markdown table.
Everything this starts (fleet subprocess, routers, redis-server) is stopped on exit,
errors included.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import routing as rb  # noqa: E402  (benchmarks/routing.py; sets up sys.path for ROOT)

SETUPS = ("one", "two", "two-noshare")
WORKER_SETUPS = ("workers-1", "workers-2", "workers-4")  # --workers N, one router
TARGET_WORKERS_RATIO = 0.97
SPLITS = ("alternate", "random", "sticky")
WORKLOAD = "1"
DEFAULT_OUT = HERE / "results" / "routing_multi.json"
TARGET_RATIO = 0.9


@dataclass
class SplitGen(rb.Gen):
    """routing.Gen sending each request to one of several routers (see --split)."""

    routers: list[str] = field(default_factory=list)
    split: str = "alternate"
    rng: random.Random = field(default_factory=random.Random)
    turns: list[dict[str, Any]] = field(default_factory=list)

    def pick(self, user: str, rnd: int) -> int:
        n = len(self.routers)
        if n == 1:
            return 0
        if self.split == "random":
            return self.rng.randrange(n)
        k = int(user.rsplit("-", 1)[1])
        return (k + rnd) % n if self.split == "alternate" else k % n

    async def send(self, body: dict[str, Any], kind: str, session_id: str | None = None,
                   turn: int = 0, warm: bool = False) -> rb.Result:
        user, rnd = session_id or "chat-0", turn
        idx = self.pick(user, rnd)
        # Gen.send reads router_url before its first await: safe with concurrent sends.
        self.router_url = self.routers[idx]
        res = await super().send(body, kind, session_id, turn, warm)
        self.turns.append(
            {
                "user": user,
                "round": rnd,
                "router": idx,
                "worker": res.worker,
                "engine": res.engine,
                "route": res.route,
                "ok": res.ok,
            }
        )
        return res


async def scrape(session: Any, urls: list[str]) -> list[dict[str, float]]:
    out = []
    for u in urls:
        async with session.get(u + "/metrics") as r:
            out.append(rb.parse_metrics(await r.text()))
    return out


def total(metrics: list[dict[str, float]], name: str) -> float:
    return sum(m.get(name, 0.0) for m in metrics)


def stickiness(turns: list[dict[str, Any]]) -> float:
    """Share of a user's turns 2..n on the engine of the same user's previous turn."""
    by_user: dict[str, dict[int, str]] = {}
    for t in turns:
        if t["ok"]:
            by_user.setdefault(t["user"], {})[t["round"]] = t["engine"]
    same = n = 0
    for rounds in by_user.values():
        for r, eng in rounds.items():
            prev = rounds.get(r - 1)
            if r > 0 and prev is not None:
                n += 1
                same += eng == prev
    return same / n if n else math.nan


def worker_switches(turns: list[dict[str, Any]]) -> float:
    """Share of turns 2..n that another worker answered than the user's previous turn."""
    by_user: dict[str, list[dict[str, Any]]] = {}
    for t in turns:
        if t["ok"]:
            by_user.setdefault(t["user"], []).append(t)
    moved = total_turns = 0
    for ts in by_user.values():
        ts.sort(key=lambda t: t["round"])
        for prev, cur in itertools.pairwise(ts):
            total_turns += 1
            moved += cur["worker"] != prev["worker"]
    return moved / total_turns if total_turns else 0.0


async def hints_on_stream(redis_url: str) -> dict[str, Any]:
    """What the routers published on `{ns}:hints` (batches and hints per router)."""
    import orjson
    import redis.asyncio as aioredis

    r = aioredis.from_url(redis_url, decode_responses=True)
    try:
        entries = await r.xrange("deepinfer:hints")
        per: dict[str, int] = {}
        for _id, fields in entries:
            per[fields.get("r", "?")] = per.get(fields.get("r", "?"), 0) + len(
                orjson.loads(fields.get("h", "[]"))
            )
        return {"batches": len(entries), "hints_per_router": sorted(per.values())}
    finally:
        await r.aclose()


async def run_setup(setup: str, split: str, args: argparse.Namespace,
                    index: str = "approximate") -> dict[str, Any]:
    import aiohttp

    from deepinfer_engine.redis_registration import RedisRegistrar
    from deepinfer_router.shared.engine_record import Capacity, EngineRecord, engine_id_for
    from tests.support.redis_server import RedisServer

    seed = args.seed * 1000 + int(WORKLOAD)
    scale = 0.4 if args.quick else 1.0
    speed = args.speed
    workers = int(setup.split("-")[1]) if setup in WORKER_SETUPS else 0
    n_routers = 1 if setup == "one" or workers else 2
    redis: RedisServer | None = None
    routers: list[rb.Router] = []
    registrars: list[RedisRegistrar] = []
    hints: dict[str, Any] = {}
    bpe: rb.BpeTokenizer | None = args.bpe
    fleet: rb.Fleet | None = None
    if bpe is None:
        fleet = rb.Fleet([args.kv_blocks] * args.engines, speed)
    try:
        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(
            # --workers: a new connection per request, so the kernel picks the worker
            connector=aiohttp.TCPConnector(limit=0, force_close=bool(workers)),
            timeout=timeout,
        ) as session:
            try:
                static_urls = fleet.urls if fleet is not None else []
                if bpe is not None:
                    # The engines register themselves (their record names the KV event
                    # feed and the tokenizer); every setup reads Redis.
                    redis = RedisServer()
                    fleet = rb.Fleet([args.kv_blocks] * args.engines, speed,
                                     registry=redis.url, tokenizer=str(bpe.path))
                    extra = ["--redis-url", redis.url, *(args.router_arg or ())]
                    if setup == "two-noshare":
                        extra.append("--no-share-hints")
                    if index == "approximate":
                        extra += ["--kv-events", "off"]
                    routers += [rb.Router([], "kv-aware", extra) for _ in range(n_routers)]
                elif setup == "one":
                    routers.append(rb.Router(static_urls, "kv-aware", args.router_arg or ()))
                elif workers:
                    routers.append(rb.Router(static_urls, "kv-aware",
                                             ["--workers", str(workers),
                                              *(args.router_arg or ())]))
                else:
                    redis = RedisServer()
                    for u in static_urls:
                        reg = RedisRegistrar(redis.url)
                        await reg.start(
                            EngineRecord(
                                url=u,
                                models=[rb.MODEL],
                                labels={"engine": "sim"},
                                capacity=Capacity(
                                    kv_blocks=args.kv_blocks, block_size=rb.BLOCK_SIZE
                                ),
                            )
                        )
                        registrars.append(reg)
                    extra = ["--redis-url", redis.url, *(args.router_arg or ())]
                    if setup == "two-noshare":
                        extra.append("--no-share-hints")
                    routers += [rb.Router([], "kv-aware", extra) for _ in range(n_routers)]
                assert fleet is not None
                ids = [engine_id_for(u) for u in fleet.urls]
                for router in routers:
                    await rb.wait_ready(session, router.url, args.engines)
                    if index == "precise":
                        await rb.wait_precise(session, router.url, args.engines)
                gen = SplitGen(
                    speed,
                    session,
                    routers[0].url,
                    fleet.urls,
                    ids,
                    routers=[r.url for r in routers],
                    split=split,
                    rng=random.Random(seed),
                )
                m0 = await scrape(session, fleet.urls)
                wall0 = time.monotonic()
                await rb.drive_open(gen, rb.build(WORKLOAD, "high", seed, scale,
                                                  bpe.words if bpe else None))
                wall = time.monotonic() - wall0
                m1 = await scrape(session, fleet.urls)
                if redis is not None and setup == "two":
                    hints = await hints_on_stream(redis.url)
            finally:
                for reg in registrars:
                    try:
                        await reg.stop()
                    except Exception as exc:  # keep stopping the rest
                        print(f"registrar stop: {exc}", file=sys.stderr)
    finally:
        if fleet is not None:  # first: the engines deregister
            fleet.close()
        for router in routers:
            router.close()
        if redis is not None:
            redis.close()

    res = gen.results
    ok = [r for r in res if r.ok]
    ttft = [r.ttft * speed * 1000 for r in ok]  # model ms
    hits = total(m1, "vllm:prefix_cache_hits_total") - total(m0, "vllm:prefix_cache_hits_total")
    queries = total(m1, "vllm:prefix_cache_queries_total") - total(
        m0, "vllm:prefix_cache_queries_total"
    )
    routes: dict[str, int] = {}
    for r in res:
        routes[r.route] = routes.get(r.route, 0) + 1
    per_router = [sum(1 for t in gen.turns if t["router"] == i) for i in range(n_routers)]
    return {
        "setup": setup,
        "index": index,
        "routers": n_routers,
        "split": split if n_routers > 1 else "-",
        "requests": len(res),
        "ok": len(ok),
        "errors": len(res) - len(ok),
        "requests_per_router": per_router,
        "hit_rate": hits / queries if queries else 0.0,
        "prefix_cache_hits": hits,
        "prefix_cache_queries": queries,
        "ttft_ms": {
            "p50": rb.pct(ttft, 0.5),
            "p90": rb.pct(ttft, 0.9),
            "p99": rb.pct(ttft, 0.99),
            "mean": statistics.fmean(ttft) if ttft else math.nan,
        },
        "stickiness": stickiness(gen.turns),
        "workers": workers or None,
        "worker_switches": worker_switches(gen.turns) if workers else None,
        "requests_per_worker": {w: sum(1 for t in gen.turns if t["worker"] == w)
                                for w in sorted({t["worker"] for t in gen.turns})}
        if workers else None,
        "routes": routes,
        "hints": hints,
        "wall_s": wall,
        "loadavg_1m_after": os.getloadavg()[0],
    }


def one_router(results: list[dict[str, Any]], index: str) -> dict[str, Any] | None:
    return next((r for r in results
                 if r["setup"] == "one" and r.get("index", "approximate") == index), None)


def index_targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Routers that share nothing (two-noshare): the precise index sees what the other
    router sent, so its hit rate is >= 1.1x the approximate index's and >= 0.95x one
    precise router's."""
    out: list[dict[str, Any]] = []
    by = {(r["setup"], r["split"], r.get("index", "approximate")): r for r in results}
    one_precise = one_router(results, "precise")
    for (setup, split, index), precise in by.items():
        approx = by.get((setup, split, "approximate"))
        if setup != "two-noshare" or index != "precise":
            continue
        if approx and approx["hit_rate"]:
            ratio = precise["hit_rate"] / approx["hit_rate"]
            out.append({"what": f"hit rate two routers sharing nothing (split {split}): "
                        "precise / approximate >= 1.1", "split": split,
                        "value": round(ratio, 4), "limit": 1.1, "met": ratio >= 1.1})
        if one_precise and one_precise["hit_rate"]:
            ratio = precise["hit_rate"] / one_precise["hit_rate"]
            out.append({"what": f"hit rate two precise routers sharing nothing (split "
                        f"{split}) / one precise router >= 0.95", "split": split,
                        "value": round(ratio, 4), "limit": 0.95, "met": ratio >= 0.95})
    return out


def table(results: list[dict[str, Any]]) -> str:
    labels = {
        "one": "one router",
        "two": "two routers, shared hints",
        "two-noshare": "two routers, --no-share-hints",
        **{w: f"one router, --workers {w.split('-')[1]} (fresh connections)"
           for w in WORKER_SETUPS},
    }
    lines = [
        "| setup | index | split | requests | prefix-cache hit rate | vs one router "
        "| TTFT p50 (ms) | TTFT p90 (ms) | same engine as previous turn "
        "| turns on another worker |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in results:
        t = r["ttft_ms"]
        base = one_router(results, r.get("index", "approximate"))
        ratio = f"{r['hit_rate'] / base['hit_rate']:.3f}" if base and base["hit_rate"] else "-"
        lines.append(
            f"| {labels[r['setup']]} | {r.get('index', 'approximate')} | {r['split']} "
            f"| {r['ok']}/{r['requests']} | "
            f"{r['hit_rate']:.1%} | {ratio} | {t['p50']:.0f} | {t['p90']:.0f} | "
            f"{r['stickiness']:.1%} | "
            + (f"{r['worker_switches']:.1%} |" if r.get("worker_switches") is not None
               else "- |")
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--setups", default=",".join(SETUPS))
    ap.add_argument(
        "--split",
        default="alternate",
        help="comma-separated, each run for every two-router setup: " + ", ".join(SPLITS),
    )
    ap.add_argument("--quick", action="store_true", help="40%% of the workload's duration")
    ap.add_argument("--speed", type=float, default=2.5)  # as its published figures
    ap.add_argument("--engines", type=int, default=rb.N_ENGINES)
    ap.add_argument("--kv-blocks", type=int, default=rb.KV_BLOCKS)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--router-arg",
        action="append",
        help="extra deepinfer-router argument for every router (repeatable)",
    )
    ap.add_argument("--indexes", default="approximate",
                    help="kv-aware's prefix index per run: approximate, precise or both "
                    "(see above)")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="JSON output path")
    args = ap.parse_args()
    indexes = [x.strip() for x in args.indexes.split(",") if x.strip()]
    for x in indexes:
        if x not in rb.INDEXES:
            raise SystemExit(f"unknown index {x!r} (choose from {', '.join(rb.INDEXES)})")
    setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    for s in setups:
        if s not in (*SETUPS, *WORKER_SETUPS):
            raise SystemExit(f"unknown setup {s!r} (choose from "
                             f"{', '.join((*SETUPS, *WORKER_SETUPS))})")
    splits = [s.strip() for s in args.split.split(",") if s.strip()]
    for s in splits:
        if s not in SPLITS:
            raise SystemExit(f"unknown split {s!r} (choose from {', '.join(SPLITS)})")
    runs = [
        (setup, split, index) for setup in setups
        for split in (splits[:1] if setup == "one" or setup in WORKER_SETUPS else splits)
        for index in indexes
    ]
    tokenizer_tmp = tempfile.TemporaryDirectory(prefix="routing-multi-bpe-")
    args.bpe = rb.BpeTokenizer.build(Path(tokenizer_tmp.name)) if "precise" in indexes else None
    results: list[dict[str, Any]] = []
    for setup, split, index in runs:
        t = time.monotonic()
        r = asyncio.run(run_setup(setup, split, args, index))
        results.append(r)
        print(
            f"[{setup:<11} {r['split']:<9} {index:<11}] n={r['ok']}/{r['requests']} "
            f"hit {r['hit_rate']:.1%} "
            f"ttft p50/p90 {r['ttft_ms']['p50']:.0f}/{r['ttft_ms']['p90']:.0f} ms "
            f"sticky {r['stickiness']:.1%} routes {r['routes']} hints {r['hints']} "
            + (f"other worker {r['worker_switches']:.1%} {r['requests_per_worker']} "
               if r.get("worker_switches") is not None else "")
            +
            f"({time.monotonic() - t:.0f}s)",
            flush=True,
        )
    tokenizer_tmp.cleanup()
    targets: list[dict[str, Any]] = []
    for r in results:
        one = one_router(results, r["index"])
        if one and one["hit_rate"] and r["setup"] == "two":
            ratio = r["hit_rate"] / one["hit_rate"]
            targets.append(
                {
                    "what": f"hit rate two routers (shared hints, split {r['split']}, "
                    f"{r['index']}) / one router >= 0.9",
                    "split": r["split"],
                    "value": round(ratio, 4),
                    "limit": TARGET_RATIO,
                    "met": ratio >= TARGET_RATIO,
                }
            )
        if one and one["hit_rate"] and r["setup"] in WORKER_SETUPS:
            ratio = r["hit_rate"] / one["hit_rate"]
            targets.append({"what": f"hit rate {r['setup']} (fresh connection per "
                            f"request, {r['index']}) / one router >= {TARGET_WORKERS_RATIO}",
                            "split": "-", "value": round(ratio, 4),
                            "limit": TARGET_WORKERS_RATIO,
                            "met": ratio >= TARGET_WORKERS_RATIO})
        if one and one["hit_rate"]:
            r["hit_rate_vs_one"] = round(r["hit_rate"] / one["hit_rate"], 4)
    targets += index_targets(results)
    report = {
        "command": "python benchmarks/routing_multi.py " + " ".join(sys.argv[1:]),
        "source": {"dir": str(rb.ROOT), "revision": rb.source_revision()},
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        },
        "calibration": {
            "workload": rb.WORKLOADS[WORKLOAD],
            "engines": args.engines,
            "kv_blocks": args.kv_blocks,
            "block_size": rb.BLOCK_SIZE,
            "speed": args.speed,
            "policy": "kv-aware",
            "indexes": indexes,
            "splits": splits,
            "quick": args.quick,
            "seed": args.seed,
            "time_unit": "model seconds: wall-clock latencies x speed, arrivals / speed",
        },
        "results": results,
        "targets": targets,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=float) + "\n")
    print()
    print(table(results))
    print()
    for tg in targets:
        print(f"{'PASS' if tg['met'] else 'FAIL'}: {tg['what']}: {tg['value']}")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
