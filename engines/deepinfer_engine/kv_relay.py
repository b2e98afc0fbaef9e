"""vLLM's KV event feed, published on this host's advertised address only.

vLLM 0.32 binds its PUB socket only for a wildcard (`tcp://*:P`: every interface), ipc or
inproc endpoint, and connects it to any other address (vllm/distributed/kv_events.py,
ZmqEventPublisher._is_bind_endpoint). The feed carries prompt token ids, so it must not
listen on every interface, and several routers must be able to subscribe. So vLLM
publishes on a private ipc socket in the state directory, and this relay (a ZMQ
SUB -> PUB proxy in a thread of the engine manager) republishes it on
`tcp://<advertised address>:<port>`. The replay socket needs no relay: vLLM binds it
on the address given. Routers subscribe to the relay and ask vLLM for replays.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import zmq

from deepinfer_router.shared.engine_record import KvEventsEndpoints

IPC_PATH_MAX = 100  # the kernel's limit for a unix socket path is 107 bytes


@dataclass(frozen=True)
class KvEventsPlan:
    """Where vLLM publishes (ipc), where the relay and vLLM's replay socket listen
    (tcp on the advertised address), and the topic."""

    ipc_endpoint: str
    public: KvEventsEndpoints

    def vllm_config(self) -> str:
        """The value of vLLM's `--kv-events-config`."""
        return json.dumps({
            "enable_kv_cache_events": True, "publisher": "zmq",
            "endpoint": self.ipc_endpoint, "replay_endpoint": self.public.replay_endpoint,
            "topic": self.public.topic,
        })


def bind_address(host: str) -> str:
    """An address ZMQ can bind (it does not resolve names): the host's IP."""
    try:
        return socket.gethostbyname(host)
    except OSError:
        return host


def ipc_path(state_dir: Path, engine_id: str) -> Path:
    """A private socket path: the state directory, or a 0700 temp directory when that
    path would be too long for a unix socket."""
    path = state_dir / "kv" / f"{engine_id}.ipc"
    if len(str(path)) > IPC_PATH_MAX:
        path = Path(tempfile.gettempdir()) / f"deepinfer-kv-{os.getuid()}" / f"{engine_id}.ipc"
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def plan_kv_events(state_dir: Path, engine_id: str, address: str, ports: tuple[int, int]
                   ) -> KvEventsPlan:
    pub_port, replay_port = ports
    host = f"[{address}]" if ":" in address else address
    return KvEventsPlan(
        ipc_endpoint=f"ipc://{ipc_path(state_dir, engine_id)}",
        public=KvEventsEndpoints(endpoint=f"tcp://{host}:{pub_port}",
                                 replay_endpoint=f"tcp://{host}:{replay_port}",
                                 topic=f"kv@{engine_id}"))


class KvEventsRelay:
    """SUB (connected to vLLM's ipc PUB) -> PUB (bound on the advertised address)."""

    def __init__(self, plan: KvEventsPlan) -> None:
        self.plan = plan
        self._ctx = zmq.Context()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        sub = self._ctx.socket(zmq.XSUB)
        pub = self._ctx.socket(zmq.XPUB)
        try:
            sub.connect(self.plan.ipc_endpoint)
            pub.setsockopt(zmq.SNDHWM, 100_000)
            pub.bind(self.plan.public.endpoint)  # the port taken: the caller's error
        except zmq.ZMQError:
            sub.close(linger=0)
            pub.close(linger=0)
            raise
        # XSUB/XPUB forward subscriptions upstream, so vLLM's PUB sends only what some
        # router subscribed to (and nothing when none listens).
        self._thread = threading.Thread(target=self._run, args=(sub, pub), daemon=True,
                                        name="kv-events-relay")
        self._thread.start()

    @staticmethod
    def _run(sub: zmq.Socket, pub: zmq.Socket) -> None:  # type: ignore[type-arg]
        with contextlib.suppress(zmq.ContextTerminated, zmq.ZMQError):
            zmq.proxy(sub, pub)
        sub.close(linger=0)
        pub.close(linger=0)

    def stop(self) -> None:
        # term() makes the proxy raise ContextTerminated in its thread, which closes its
        # sockets; term() returns once they are closed.
        self._ctx.term()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        with contextlib.suppress(OSError):
            Path(self.plan.ipc_endpoint.removeprefix("ipc://")).unlink()
