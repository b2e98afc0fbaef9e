"""Hostile request bodies against a fresh router: event-loop lag and memory.

For each shape of the hostile corpus (a multipart body of CRLFs, a token-id prompt, the
same for an unknown model, deep nesting, many tiny objects, one huge string) and each
size (8 and 32 MiB by default), a fresh `deepinfer-router` subprocess in front of an
nginx engine (benchmarks/overhead.py's) gets the body once, then `--repeats` times in
all, and this reports:

  status      what the router answered, and how long the first answer took
  lag         inside the router: the largest delay of its 10 ms event-loop probe
              (deepinfer_event_loop_lag_seconds, --loop-lag-interval-s 0.01), as the
              upper bound of the histogram bucket it fell in; and from outside: the
              slowest of GET /health sent every 10 ms meanwhile
  peak RSS    growth of the router's peak RSS (VmHWM, reset after warm-up) over its RSS
              before the first hostile body, and as a multiple of the body size
  residual    RSS after all repeats minus RSS after the first

and checks the targets: lag <= 100 ms, peak growth <= 8x the body, residual growth
<= 1 body size over the repeats (allocator noise); a 32 MiB shape may instead be refused
within 1 s. Also an oversized Content-Length (1 GB announced, no body sent): answered
413 within 1 s.

    python benchmarks/hostile.py [--sizes-mib 8,32] [--repeats 100] [--checkout DIR]
                                 [--out benchmarks/results/hostile.json]

`--checkout DIR` runs the router from another checkout (e.g. a `git worktree` of an
older commit) to measure "before" figures; a router without the loop-lag metric is
measured from outside only. Loopback only; every process is stopped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from overhead import MODEL, free_port, nginx_engines, stop, wait_http  # noqa: E402

MIB = 1024 * 1024
DEFAULT_OUT = HERE / "results" / "hostile.json"
LAG_LIMIT_S = 0.100
PEAK_FACTOR = 8.0


def _json_array(prefix: bytes, item: bytes, suffix: bytes, size: int) -> bytes:
    n = max(1, (size - len(prefix) - len(suffix)) // (len(item) + 1))
    return prefix + b",".join([item] * n) + suffix


# name -> (path, content type, body of about `size` bytes)
SHAPES: dict[str, Callable[[int], tuple[str, str, bytes]]] = {
    "crlf-multipart": lambda size: (
        "/v1/audio/transcriptions", "multipart/form-data; boundary=B", b"\r\n" * (size // 2)
    ),
    "token-ids": lambda size: (
        "/v1/completions", "application/json",
        _json_array(b'{"model": "%s", "prompt": [' % MODEL.encode(), b"0", b"]}", size),
    ),
    "token-ids-unknown-model": lambda size: (
        "/v1/completions", "application/json",
        _json_array(b'{"model": "no-such-model", "prompt": [', b"0", b"]}", size),
    ),
    "deep-nesting": lambda size: ("/v1/chat/completions", "application/json", b"[" * size),
    "tiny-objects": lambda size: (
        "/v1/chat/completions", "application/json",
        _json_array(b'{"model": "%s", "messages": [' % MODEL.encode(), b"{}", b"]}", size),
    ),
    "huge-string": lambda size: (
        "/v1/completions", "application/json",
        b'{"model": "%s", "max_tokens": 1, "prompt": "' % MODEL.encode()
        + b"a" * (size - 60) + b'"}',
    ),
}


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of `pid`, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def lag_histogram(port: int) -> dict[float, float] | None:
    """Cumulative bucket counts of deepinfer_event_loop_lag_seconds, or None when the
    router has no such metric."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    buckets = {}
    for m in re.finditer(r'deepinfer_event_loop_lag_seconds_bucket\{le="([^"]+)"\} (\S+)', text):
        buckets[float(m.group(1))] = float(m.group(2))
    return buckets or None


def worst_lag_bucket(before: dict[float, float], after: dict[float, float]) -> float:
    """The smallest bucket bound that holds every probe observed in between."""
    total = after[float("inf")] - before[float("inf")]
    for bound in sorted(after):
        if after[bound] - before.get(bound, 0.0) >= total:
            return bound
    return float("inf")


class HealthProber:
    """GET /health every 10 ms on a kept-alive connection, in a thread: the slowest answer
    is the lag seen from outside (it includes the network and this process)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.worst = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        while not self._stop.is_set():
            t0 = time.perf_counter()
            try:
                conn.request("GET", "/health")
                conn.getresponse().read()
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                continue
            self.worst = max(self.worst, time.perf_counter() - t0)
            self._stop.wait(0.01)
        conn.close()

    def __enter__(self) -> HealthProber:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(35)


def send(port: int, path: str, content_type: str, body: bytes) -> tuple[int, float]:
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", path, body, {"Content-Type": content_type})
        resp = conn.getresponse()
        resp.read()
        return resp.status, time.perf_counter() - t0
    except (ConnectionError, http.client.HTTPException):  # closed while we sent
        return 0, time.perf_counter() - t0
    finally:
        conn.close()


def oversized_content_length(port: int) -> tuple[int, float]:
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nContent-Length: 1000000000\r\n\r\n")
        head = b""
        with contextlib.suppress(TimeoutError):  # no answer in 10 s: status 0
            while b"\r\n" not in head:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                head += chunk
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return status, time.perf_counter() - t0


@contextlib.contextmanager
def router(engine_ports: list[int], workdir: Path, checkout: Path | None,
           max_body_mb: float) -> Iterator[tuple[int, subprocess.Popen[Any], bool]]:
    port = free_port()
    cwd = checkout or HERE.parent
    cmd = [sys.executable, "-m", "deepinfer_router.cli", "--host", "127.0.0.1",
           "--port", str(port), "--log-level", "warning", "--max-body-mb", f"{max_body_mb:g}"]
    cmd += [a for p in engine_ports for a in ("--engine", f"http://127.0.0.1:{p}")]
    help_text = subprocess.run([*cmd[:3], "--help"], cwd=cwd, capture_output=True,
                               text=True, timeout=60).stdout
    has_probe = "--loop-lag-interval-s" in help_text
    if has_probe:
        cmd += ["--loop-lag-interval-s", "0.01"]
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    with open(workdir / "router.log", "ab") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_http(port, "/ready", 30, proc)
            yield port, proc, has_probe
        finally:
            stop(proc)


def measure_shape(name: str, size: int, ports: list[int], args: argparse.Namespace,
                  workdir: Path) -> dict[str, Any]:
    path, content_type, body = SHAPES[name](size)
    with router(ports, workdir, args.checkout, max(32.0, size / MIB)) as (port, proc, probe):
        # Warm-up: one small valid request, so that lazily built state is in the baseline.
        send(port, "/v1/completions", "application/json",
             json.dumps({"model": MODEL, "prompt": "hi"}).encode())
        time.sleep(0.3)
        reset_peak(proc.pid)
        rss0 = proc_status(proc.pid)["VmRSS"]
        hist0 = lag_histogram(port) if probe else None
        with HealthProber(port) as prober:
            status, first_s = send(port, path, content_type, body)
            time.sleep(0.05)
            status_mem = proc_status(proc.pid)
            hist1 = lag_histogram(port) if probe else None
            rss1 = status_mem["VmRSS"]
            for _ in range(args.repeats - 1):
                send(port, path, content_type, body)
            time.sleep(0.2)
            rss_end = proc_status(proc.pid)["VmRSS"]
            hist_end = lag_histogram(port) if probe else None
        peak = status_mem["VmHWM"] - rss0
    lag_first = worst_lag_bucket(hist0, hist1) if hist0 and hist1 else None
    lag_all = worst_lag_bucket(hist0, hist_end) if hist0 and hist_end else None
    refused_fast = 400 <= status < 500 and first_s <= 1.0
    row = {
        "shape": name, "size_mib": round(len(body) / MIB, 2), "status": status,
        "first_answer_s": round(first_s, 3),
        "lag_inside_max_s": lag_all, "lag_inside_first_s": lag_first,
        "lag_outside_max_s": round(prober.worst, 3),
        "peak_rss_growth_mib": round(peak / MIB, 1),
        "peak_rss_growth_x_body": round(peak / len(body), 2),
        "residual_growth_mib": round((rss_end - rss1) / MIB, 1),
        "repeats": args.repeats,
    }
    lag = lag_all if lag_all is not None else prober.worst
    within = (lag <= LAG_LIMIT_S and peak <= PEAK_FACTOR * len(body)
              and rss_end - rss1 <= len(body))
    row["ok"] = within or (size > 8 * MIB and refused_fast)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes-mib", default="8,32", help="Comma-separated body sizes in MiB.")
    p.add_argument("--repeats", type=int, default=100, help="Bodies sent per shape and size.")
    p.add_argument("--shapes", default=",".join(SHAPES), help="Comma-separated shapes.")
    p.add_argument("--checkout", type=Path, default=None,
                   help="Run the router from this checkout (before/after comparisons).")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file.")
    args = p.parse_args(argv)
    sizes = [int(float(x) * MIB) for x in args.sizes_mib.split(",") if x.strip()]
    shapes = [x.strip() for x in args.shapes.split(",") if x.strip()]
    workdir = Path(tempfile.mkdtemp(prefix="deepinfer-hostile-"))
    workdir.chmod(0o755)
    rows = []
    with nginx_engines(workdir, 1) as ports:
        with router(ports, workdir, args.checkout, 32.0) as (port, _, _):
            status, elapsed = oversized_content_length(port)
        print(f"oversized Content-Length: {status} in {elapsed * 1000:.0f} ms", flush=True)
        oversized = {"status": status, "answer_s": round(elapsed, 3),
                     "ok": status == 413 and elapsed <= 1.0}
        for size in sizes:
            for name in shapes:
                row = measure_shape(name, size, ports, args, workdir)
                rows.append(row)
                print(json.dumps(row), flush=True)
    result = {
        "command": " ".join(["python benchmarks/hostile.py",
                             *(argv if argv is not None else sys.argv[1:])]),
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "checkout": str(args.checkout) if args.checkout else None,
        "oversized_content_length": oversized,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'shape':24s} {'MiB':>5s} {'status':>6s} {'first s':>7s} {'lag in':>7s} "
          f"{'lag out':>7s} {'peak MiB':>8s} {'x body':>6s} {'resid MiB':>9s}  ok")
    for r in rows:
        lag_in = "-" if r["lag_inside_max_s"] is None else f"{r['lag_inside_max_s']:g}"
        print(f"{r['shape']:24s} {r['size_mib']:5.0f} {r['status']:6d} {r['first_answer_s']:7.3f} "
              f"{lag_in:>7s} {r['lag_outside_max_s']:7.3f} {r['peak_rss_growth_mib']:8.1f} "
              f"{r['peak_rss_growth_x_body']:6.2f} {r['residual_growth_mib']:9.1f}  {r['ok']}")
    ok = oversized["ok"] and all(r["ok"] for r in rows)
    print(f"\nall targets met: {ok}; written {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
