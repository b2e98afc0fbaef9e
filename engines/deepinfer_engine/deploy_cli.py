"""`deepinfer-engine deploy | deployments | scale | undeploy | hosts`: front-ends to a
router's /v1/deployments and /v1/hosts (admin API). Plain HTTP with the standard
library: these run once and exit, so nothing here needs an event loop."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any

DEFAULT_ROUTER = "http://127.0.0.1:8080"
TERMINAL = ("Running", "Failed")


class ApiError(Exception):
    pass


class Api:
    def __init__(self, router: str, admin_key: str | None, timeout_s: float = 10.0) -> None:
        self.base = router.rstrip("/")
        self.key = admin_key
        self.timeout_s = timeout_s

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.key:
            req.add_header("Authorization", f"Bearer {self.key}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            try:
                payload = json.loads(exc.read() or b"null")
                message = payload["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = exc.reason
            raise ApiError(f"{exc.code}: {message}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            raise ApiError(f"cannot reach the router at {self.base}: {exc}") from None


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--router", default=os.environ.get("DEEPINFER_ROUTER_URL",
                                                           DEFAULT_ROUTER),
                        help="router base URL (env DEEPINFER_ROUTER_URL; default "
                        f"{DEFAULT_ROUTER})")
    parser.add_argument("--admin-key", default=os.environ.get("DEEPINFER_ADMIN_KEY"),
                        help="the router's admin key (env DEEPINFER_ADMIN_KEY)")


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def format_deployments(deps: list[dict[str, Any]]) -> str:
    if not deps:
        return "no deployments"
    rows = [["ID", "MODEL", "READY", "GEN", "REPLICA", "STATE", "HOST", "GPUS", "ERROR"]]
    for d in deps:
        head = [d["id"], d["served_model_name"],
                f"{d['replicas_running']}/{d['replicas_wanted']}"
                + (" deleting" if d.get("deleting") else ""), str(d["generation"])]
        replicas = d.get("replicas") or []
        if not replicas:
            rows.append([*head, "-", "-", "-", "-", ""])
        for i, r in enumerate(replicas):
            cells = head if i == 0 else ["", "", "", ""]
            error = (r.get("last_error") or "")[:60]
            rows.append([*cells, str(r["index"]), r["state"], r.get("host") or "-",
                         ",".join(map(str, r.get("gpus") or [])) or "-", error])
    return _table(rows)


def format_hosts(hosts: list[dict[str, Any]]) -> str:
    if not hosts:
        return "no live agents"
    rows = [["HOST", "LABELS", "GPU", "NAME", "CC", "FREE GiB", "TOTAL GiB", "REPLICA", "AGE"]]
    for h in hosts:
        labels = ",".join(f"{k}={v}" for k, v in sorted(h.get("labels", {}).items()))
        age = f"{h.get('heartbeat_age_s', 0):.0f}s"
        gpus = h.get("gpus") or []
        if not gpus:
            rows.append([h["id"], labels, "-", f"cpu (max {h.get('max_engines')})", "-", "-",
                         "-", ",".join(h.get("replicas") or []) or "-", age])
        for i, g in enumerate(gpus):
            rows.append([h["id"] if i == 0 else "", labels if i == 0 else "", str(g["index"]),
                         g.get("name", ""), g.get("compute_capability") or "-",
                         f"{g['memory_free'] / 2**30:.1f}", f"{g['memory_total'] / 2**30:.1f}",
                         g.get("replica") or "-", age if i == 0 else ""])
    return _table(rows)


def _progress(d: dict[str, Any]) -> str:
    states = ", ".join(f"{r['index']}:{r['state']}" + (f"@{r['host']}" if r.get("host") else "")
                       for r in d.get("replicas") or [])
    return f"{d['id']}: {d['replicas_running']}/{d['replicas_wanted']} running [{states}]"


def wait_ready(api: Api, dep_id: str, timeout_s: float, interval_s: float = 1.0) -> int:
    """Print progress until every wanted replica runs (0), one stays Failed (1), or the
    timeout (1)."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        _, d = api.call("GET", f"/v1/deployments/{dep_id}")
        line = _progress(d)
        if line != last:
            print(line, flush=True)
            last = line
        wanted = [r for r in d["replicas"] if r.get("desired")]
        if wanted and all(r["state"] == "Running" for r in wanted):
            return 0
        if d["replicas_wanted"] == 0:
            return 0
        final = [r for r in wanted if r["state"] == "Failed" and not r.get("claimed_by")
                 and r.get("generation") == d["generation"]]
        if final and all(r["state"] in TERMINAL for r in wanted):
            for r in final:
                print(f"replica {r['index']} failed: {r.get('last_error')}\n"
                      f"{r.get('log_tail') or ''}", file=sys.stderr)
            return 1
        if time.monotonic() > deadline:
            print(f"not ready after {timeout_s:g}s", file=sys.stderr)
            return 1
        time.sleep(interval_s)


def deploy_main(argv: list[str]) -> int:
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(
        prog="deepinfer-engine deploy",
        usage="deepinfer-engine deploy MODEL [options] [-- extra vllm serve args]",
        description="Declare a deployment; agents on the GPU hosts start it.")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--served-model-name")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--tp", "--tensor-parallel-size", type=int, default=1, dest="tp")
    p.add_argument("--quantization")
    p.add_argument("--dtype")
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--gpu-memory-utilization", type=float)
    p.add_argument("--label", action="append", default=[], metavar="K=V",
                   help="host selector; repeatable")
    p.add_argument("--device", help="explicit GPUs (with --replicas 1 --label host=NAME)")
    p.add_argument("--backend", choices=("native", "docker"), default="native")
    p.add_argument("--image", help="container image (--backend docker)")
    p.add_argument("--model-path", help="model directory on the host (--backend docker)")
    p.add_argument("--wait", action="store_true", help="show progress until ready or failed")
    p.add_argument("--timeout", type=float, default=1800.0, help="--wait's limit in seconds")
    _common(p)
    ns = p.parse_args(argv)
    labels = {}
    for item in ns.label:
        k, sep, v = item.partition("=")
        if not sep:
            p.error(f"--label must be key=value: {item!r}")
        labels[k] = v
    body: dict[str, Any] = {"model": ns.model, "replicas": ns.replicas,
                            "tensor_parallel_size": ns.tp, "backend": ns.backend}
    optional = {"served_model_name": ns.served_model_name, "quantization": ns.quantization,
                "dtype": ns.dtype, "max_model_len": ns.max_model_len,
                "gpu_memory_utilization": ns.gpu_memory_utilization, "device": ns.device,
                "docker_image": ns.image, "model_path": ns.model_path}
    body.update({k: v for k, v in optional.items() if v is not None})
    if labels:
        body["labels"] = labels
    if extra:
        body["extra_args"] = extra
    api = Api(ns.router, ns.admin_key)
    status, d = api.call("POST", "/v1/deployments", body)
    print(f"{'created' if status == 201 else 'already deployed'}: {d['id']} "
          f"({d['served_model_name']}, {d['replicas_wanted']} replica(s))", flush=True)
    return wait_ready(api, d["id"], ns.timeout) if ns.wait else 0


def deployments_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="deepinfer-engine deployments",
                                description="Deployments and each replica's state.")
    p.add_argument("id", nargs="?", help="one deployment")
    p.add_argument("--json", action="store_true")
    _common(p)
    ns = p.parse_args(argv)
    api = Api(ns.router, ns.admin_key)
    if ns.id:
        deps = [api.call("GET", f"/v1/deployments/{ns.id}")[1]]
    else:
        deps = api.call("GET", "/v1/deployments")[1]["deployments"]
    print(json.dumps(deps if not ns.id else deps[0], indent=2) if ns.json
          else format_deployments(deps))
    return 0


def scale_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="deepinfer-engine scale",
                                description="Change a deployment's replica count.")
    p.add_argument("id")
    p.add_argument("replicas", type=int)
    p.add_argument("--wait", action="store_true")
    p.add_argument("--timeout", type=float, default=1800.0)
    _common(p)
    ns = p.parse_args(argv)
    api = Api(ns.router, ns.admin_key)
    _, d = api.call("PATCH", f"/v1/deployments/{ns.id}", {"replicas": ns.replicas})
    print(f"{d['id']}: {d['replicas_wanted']} replica(s) wanted (generation {d['generation']})")
    return wait_ready(api, d["id"], ns.timeout) if ns.wait else 0


def undeploy_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="deepinfer-engine undeploy",
                                description="Drain, stop and remove a deployment.")
    p.add_argument("id")
    p.add_argument("--wait", action="store_true", help="until every replica has stopped")
    p.add_argument("--timeout", type=float, default=600.0)
    _common(p)
    ns = p.parse_args(argv)
    api = Api(ns.router, ns.admin_key)
    _, d = api.call("DELETE", f"/v1/deployments/{ns.id}")
    print(f"{d['id']}: {'deleted' if d['deleted'] else 'draining and stopping'}", flush=True)
    deadline = time.monotonic() + ns.timeout
    while ns.wait and not d.get("deleted"):
        if time.monotonic() > deadline:
            print(f"still stopping after {ns.timeout:g}s", file=sys.stderr)
            return 1
        time.sleep(1.0)
        try:
            api.call("GET", f"/v1/deployments/{ns.id}")
        except ApiError as exc:
            if str(exc).startswith("404"):
                print(f"{ns.id}: deleted")
                return 0
            raise
    return 0


def hosts_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="deepinfer-engine hosts",
                                description="Every live agent: labels, GPUs, replicas.")
    p.add_argument("--json", action="store_true")
    _common(p)
    ns = p.parse_args(argv)
    hosts = Api(ns.router, ns.admin_key).call("GET", "/v1/hosts")[1]["hosts"]
    print(json.dumps(hosts, indent=2) if ns.json else format_hosts(hosts))
    return 0


COMMANDS = {"deploy": deploy_main, "deployments": deployments_main, "scale": scale_main,
            "undeploy": undeploy_main, "hosts": hosts_main}


def main(command: str, argv: list[str]) -> int:
    try:
        return COMMANDS[command](argv)
    except ApiError as exc:
        print(f"deepinfer-engine {command}: {exc}", file=sys.stderr)
        return 1
