"""One replica on this host, from claim to release: plan it (GPUs reserved under the
host lock, as `launch` does), run it under the launch Supervisor, report each state to
the store while the claim is ours, count failed starts, and give the replica up after
`attempts_per_host` of them (Failed, with the log's tail) for another host to try.

The agent decides *whether* a replica runs here (agent.py); this decides nothing about
placement and only reports."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepinfer_router.shared.deployment import Deployment, ReplicaState, ReplicaStatus

from .agent_settings import AgentSettings
from .gpus import Selection
from .launch_settings import EngineHostOptions, LaunchSettings
from .launch_state import LaunchEntry, StateDir, process_start_time
from .launcher import EngineCommand, build_command
from .registration import RegistrationOptions
from .replica_command import (
    container_name,
    docker_rm_argv,
    docker_run_argv,
    docker_stop_argv,
    replica_name,
    spec_engine_args,
)
from .supervisor import Plan, Supervisor, local_base, make_plan

log = logging.getLogger("deepinfer.engine.agent")

_STATES: dict[str, ReplicaState] = {
    "starting": "Starting", "restarting": "Starting", "ready": "Running",
    "stopping": "Stopping",
}


@dataclass
class Outcome:
    """How a replica's run on this host ended."""

    failed: bool  # True: gave up here after attempts_per_host failed starts
    status: ReplicaStatus


class ReplicaRunner:
    def __init__(
        self,
        settings: AgentSettings,
        deployment: Deployment,
        index: int,
        selection: Selection,
        port: int,
        state: StateDir,
        report: Callable[[ReplicaStatus], Coroutine[Any, Any, bool]],
        advertise_host: str,
        previous: ReplicaStatus | None = None,
        adopt: LaunchEntry | None = None,
    ) -> None:
        self.s = settings
        self.advertise_host = advertise_host
        self.deployment = deployment
        self.index = index
        self.selection = selection
        self.port = port
        self.state = state
        self._report = report
        self._adopt = adopt
        self._stop = asyncio.Event()
        self._drain = True
        self._stop_timeout_s: float | None = None
        self.lost = False  # the claim was lost: nothing of ours to release
        self._supervisor: Supervisor | None = None
        self._writes: set[asyncio.Task[bool]] = set()
        self._write_lock = asyncio.Lock()
        failed_hosts = list(previous.failed_hosts) if previous is not None and (
            previous.generation == deployment.generation) else []
        self.status = ReplicaStatus(
            deployment=deployment.id, index=index, state="Starting", host=settings.agent_id,
            gpus=selection.indices, gpu_uuids=selection.uuids, since=time.time(),
            generation=deployment.generation, failed_hosts=failed_hosts,
        )

    @property
    def key(self) -> tuple[str, int]:
        return self.deployment.id, self.index

    def stop(self, *, drain: bool = True, timeout_s: float | None = None) -> None:
        """Ask the replica to stop: drained (scale-down, delete, agent shutdown) or at
        once (claim lost, self-fencing: `timeout_s` bounds SIGTERM to SIGKILL)."""
        self._drain = self._drain and drain
        if timeout_s is not None:
            self._stop_timeout_s = min(self._stop_timeout_s or timeout_s, timeout_s)
        self._stop.set()
        if self._supervisor is not None:
            self._supervisor.request_stop(drain=self._drain, timeout_s=self._stop_timeout_s)

    def observe(self, deployment: Deployment) -> None:
        """A newer generation of our deployment (a scale): report that we have seen it."""
        if deployment.generation != self.deployment.generation:
            self.deployment = deployment
            self._set(self.status.state, generation=deployment.generation)

    # --- status ------------------------------------------------------------------------

    def _set(self, state: ReplicaState, **changes: object) -> None:
        if state != self.status.state:
            changes["since"] = time.time()
        self.status = self.status.model_copy(update={"state": state, **changes})
        task = asyncio.create_task(self._write_latest())
        self._writes.add(task)  # keep a reference until done
        task.add_done_callback(self._writes.discard)

    async def _write_latest(self) -> bool:
        # One write at a time, each of the newest status: writes on separate connections
        # could land out of order, and a late "Starting" must not hide "Running".
        async with self._write_lock:
            return await self._report(self.status)

    def _on_supervisor_state(self, state: str) -> None:
        mapped = _STATES.get(state)
        if mapped is None:
            return
        sup = self._supervisor
        changes: dict[str, object] = {}
        if mapped == "Running" and sup is not None and sup.record is not None:
            changes = {"engine_id": sup.record.id, "url": sup.record.url}
        self._set(mapped, **changes)

    # --- the run -----------------------------------------------------------------------

    def launch_settings(self) -> LaunchSettings:
        spec = self.deployment.spec
        name = replica_name(self.deployment.id, self.index)
        labels = [*self.s.labels, f"deployment={self.deployment.id}",
                  f"replica={self.index}", f"agent={self.s.agent_id}"]
        # Every option launch and the agent share, so a new one cannot be forgotten here;
        # the GPUs and labels are this replica's own.
        shared = (set(EngineHostOptions.model_fields) | set(RegistrationOptions.model_fields)) \
            - {"gpus", "labels"}
        host_opts = {k: getattr(self.s, k) for k in sorted(shared)}
        return LaunchSettings(
            **host_opts,
            model=spec.model, served_model_name=spec.served_name,
            extra_args=spec_engine_args(spec),
            gpus=",".join(self.selection.uuids) or "none",
            tp=spec.tensor_parallel_size, gpu_memory_utilization=spec.gpu_memory_utilization,
            port=self.port,
            advertise_url=f"http://{self.advertise_host}:{self.port}",
            labels=labels, log_file=str(self.state.logs / f"{name}.log"),
            # A container cannot publish on the host's private socket: no feed there.
            kv_events="off" if spec.backend == "docker" else "on",
        )

    def _build(self, s: LaunchSettings, cvd: str | None, tp: int) -> EngineCommand:
        spec = self.deployment.spec
        if spec.backend != "docker":
            return build_command(s, cvd, tp)
        name = container_name(self.deployment.id, self.index)
        return EngineCommand(
            argv=docker_run_argv(spec, name=name, gpu_uuids=self.selection.uuids,
                                 port=self.port),
            env=dict(os.environ), served_name=spec.served_name,
            stop_argv=docker_stop_argv(name, s.stop_timeout_s),
            cleanup_argv=docker_rm_argv(name))

    def _plan(self, s: LaunchSettings) -> Plan:
        extra = {"deployment": self.deployment.id, "deployment_uid": self.deployment.uid,
                 "replica": self.index, "agent": self.s.agent_id}
        if self._adopt is not None:
            entry = self._adopt
            pid = os.getpid()  # ours now: `list` shows it as supervised again
            self.state.update(entry.id, pid=pid, pid_start=process_start_time(pid))
            return Plan(entry=entry, command=self._build(s, ",".join(entry.gpus) or None,
                                                          s.tp or 1),
                        probe_base=local_base(s.host, entry.port),
                        advertise_url=entry.url, log_path=Path(entry.log_file))
        return make_plan(s, self.state, build=self._build, entry_extra=extra)

    async def run(self) -> Outcome:
        try:
            s = self.launch_settings()
        except Exception as exc:  # a spec this host cannot express as a launch
            self.status = self.status.model_copy(update={
                "state": "Failed", "since": time.time(), "attempts": 1,
                "last_error": f"cannot launch here: {exc}",
                "failed_hosts": [*self.status.failed_hosts, self.s.agent_id]})
            return Outcome(failed=True, status=self.status)
        attempts = 0
        backoff = max(self.s.restart_backoff_s, 0.5)
        self._set("Starting", attempts=0)
        while not self._stop.is_set():
            error: str | None
            log_tail: str | None
            try:
                plan = await asyncio.to_thread(self._plan, s)
            except Exception as exc:  # GPU gone, port taken: a failed start like any other
                code, error, log_tail = 1, f"cannot start here: {exc}", None
            else:
                try:
                    code, error, log_tail = await self._supervise(s, plan)
                except Exception as exc:  # e.g. the command cannot be executed at all
                    log.exception("replica %s/%d: the engine could not be run", *self.key)
                    code, error, log_tail = 1, f"cannot run the engine: {exc}", None
            if code == 0 or self._stop.is_set():
                break
            attempts += 1
            log.warning("replica %s/%d failed on this host (%d of %d): %s", *self.key,
                        attempts, self.s.attempts_per_host, error)
            if attempts >= self.s.attempts_per_host:
                self.status = self.status.model_copy(update={
                    "state": "Failed", "since": time.time(), "attempts": attempts,
                    "last_error": error, "log_tail": log_tail, "engine_id": None, "url": None,
                    "failed_hosts": [*self.status.failed_hosts, self.s.agent_id]})
                await self._flush()  # the agent releases the claim with this status
                return Outcome(failed=True, status=self.status)
            self._set("Starting", attempts=attempts, last_error=error, log_tail=log_tail)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=backoff)
            backoff = min(backoff * 2, self.s.restart_backoff_max_s)
        await self._flush()
        return Outcome(failed=False, status=self.status)

    async def _supervise(self, s: LaunchSettings, plan: Plan) -> tuple[int, str | None, str | None]:
        adopt, self._adopt = self._adopt, None
        try:
            plan.log_path.parent.mkdir(parents=True, exist_ok=True)
            # A local append-only file, as `launch` uses: opening it does not block.
            with open(plan.log_path, "a", buffering=1) as logf:  # noqa: ASYNC230
                sup = Supervisor(s, plan, self.state, logf, in_agent=True,
                                 on_state=self._on_supervisor_state,
                                 drain_timeout_s=self.s.drain_timeout_s, adopt=adopt)
                self._supervisor = sup
                if self._stop.is_set():
                    sup.request_stop(drain=self._drain, timeout_s=self._stop_timeout_s)
                code = await sup.run()
        finally:
            self._supervisor = None
            await asyncio.to_thread(self.state.remove, plan.entry.id)
        return code, sup.last_error, sup.log_tail

    async def _flush(self) -> None:
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)

