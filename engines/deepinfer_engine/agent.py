"""`deepinfer-engine agent`: makes this host's share of the declared deployments so.

Level-triggered reconcile, as a Kubernetes controller does: on every change notice (a
Redis stream) and at least every --reconcile-interval-s, compare what is desired with
what runs here, and act:

- a replica of ours no longer wanted (scaled down, deployment deleted): drain and stop
  it, release its claim (and finish a deletion when it was the last);
- an unclaimed replica this host can hold (placement.py): wait a moment proportional to
  this host's load (the least-loaded host usually wins), claim it atomically, check the
  allow-lists, and run it (replica.py);
- a replica that failed `attempts_per_host` times here is released as Failed for another
  host; after `max_failed_hosts` hosts it stays Failed until the deployment changes.

Claims are leases renewed every third of --lease-s with the host record. An agent whose
renewals fail for the lease minus a margin stops its engines at once (self-fencing):
by the time another host's claim can succeed, this host's engines are gone and their
registrations expired (lease > registry TTL), so no replica is ever served twice.

SIGTERM/SIGINT drains and stops every replica and releases it. A crash leaves the
engines running: the next run (same --agent-id and --state-dir) adopts those whose claim
is still its own, and stops the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
import time
from collections.abc import Callable

from deepinfer_router.shared.deployment import (
    Deployment,
    HostGpu,
    HostRecord,
    ReplicaStatus,
)
from deepinfer_router.shared.deployment_store import DeploymentStore
from deepinfer_router.shared.log_setup import configure_logging
from deepinfer_router.shared.redis_store import connect
from deepinfer_router.shared.registry_url import redact
from deepinfer_router.shared.tasks import cancel_and_wait

from .agent_settings import AgentSettings
from .allow_list import AllowList
from .gpus import Selection, parse_gpu_list
from .launch_state import LaunchEntry, StateDir, leader_reused, resolve_state_dir
from .launcher import port_free, run_bounded, stop_unsupervised_group
from .nvml import GpuSnapshot, GpuSource, NvmlUnavailable, open_gpu_source
from .placement import CapabilityTable, HostView, load_fraction, place
from .replica import Outcome, ReplicaRunner
from .replica_command import container_of, docker_rm_argv

log = logging.getLogger("deepinfer.engine.agent")

Key = tuple[str, int]
CLAIM_DELAY_PER_LOAD_S = 0.5  # a full host waits this long before claiming; an idle one not


class Agent:
    def __init__(
        self, s: AgentSettings, gpu_source: Callable[[], GpuSource] = open_gpu_source
    ) -> None:
        self.s = s
        self.id = s.agent_id
        self.state = StateDir(resolve_state_dir(s.state_dir))
        self._gpu_source = gpu_source
        self.table = CapabilityTable.load(s.capabilities_file)
        self.allow = AllowList(tuple(s.allow_image), tuple(s.allow_model_root),
                               tuple(a if a.startswith("-") else f"--{a}"
                                     for a in s.allow_extra_arg))
        assert s.registry
        # Calls must end well within a renewal period, or a slow Redis eats the lease.
        self._socket_timeout_s = min(2.0, s.lease_s / 6)
        self.redis = connect(s.registry, socket_timeout=self._socket_timeout_s)
        self.store = DeploymentStore(self.redis, s.registry_namespace)
        self.runners: dict[Key, ReplicaRunner] = {}
        self._tasks: dict[Key, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._host_changed = asyncio.Event()
        self._stopping = asyncio.Event()
        self._last_renewed = time.monotonic()
        self._renew_failing = False
        self.fenced = False
        self._snapshot: GpuSnapshot | None = None
        self._started_at = time.time()
        self._adoption_done = False
        self.advertise_host = s.advertise_host or ""  # resolved in run() (a DNS lookup)

    # --- what this host has ------------------------------------------------------------

    def _read_gpus(self) -> GpuSnapshot | None:
        """This agent's GPUs now (only those --gpus names), or None on a CPU-only host."""
        if self.s.gpus == "none":
            return None
        snap = self._gpu_source().snapshot()
        if self.s.gpus != "auto":
            named = set(parse_gpu_list(self.s.gpus))
            snap = GpuSnapshot(snap.driver_version, [
                g for g in snap.gpus if str(g.index) in named or g.uuid in named])
        return snap

    async def _host_view(self) -> tuple[HostView, list[LaunchEntry]]:
        entries = await asyncio.to_thread(self.state.entries)
        try:
            self._snapshot = await asyncio.to_thread(self._read_gpus)
        except NvmlUnavailable as exc:
            log.error("cannot read GPUs: %s", exc)
            raise
        reserved = {u for e in entries for u in e.gpus}
        reserved |= {u for r in self.runners.values() for u in r.selection.uuids}
        view = HostView(labels=self.s.host_labels(), snapshot=self._snapshot,
                        reserved=reserved, engines=len(self.runners),
                        max_engines=self.s.max_engines)
        return view, entries

    def _free_port(self, entries: list[LaunchEntry]) -> int | None:
        taken = {r.port for r in self.runners.values()} | {e.port for e in entries}
        first, last = self.s.ports()
        for port in range(first, last + 1):
            if port not in taken and port_free(self.s.host, port):
                return port
        return None

    def host_record(self) -> HostRecord:
        users = {u: f"{r.deployment.id}/{r.index}" for r in self.runners.values()
                 for u in r.selection.uuids}
        gpus = [HostGpu(index=g.index, uuid=g.uuid, name=g.name, memory_total=g.memory_total,
                        memory_free=g.memory_free, compute_capability=g.compute_capability,
                        replica=users.get(g.uuid))
                for g in (self._snapshot.gpus if self._snapshot else [])]
        return HostRecord(
            id=self.id, hostname=socket.gethostname(), labels=self.s.host_labels(), gpus=gpus,
            cpu_only=self.s.gpus == "none", max_engines=self.s.max_engines,
            replicas=sorted(f"{d}/{i}" for d, i in self.runners), started_at=self._started_at,
            heartbeat_at=time.time(), lease_s=self.s.lease_s)

    # --- leases ------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        period = max(0.2, self.s.lease_s / 3)
        while not self._stopping.is_set():
            self._host_changed.clear()
            try:
                await self._renew()
            except Exception:  # never let the lease loop die (the fence would fire)
                log.exception("lease renewal failed unexpectedly")
            # Early when a replica starts or ends here, so /v1/hosts shows it at once.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._host_changed.wait(), timeout=period)

    async def _renew(self) -> None:
        sent = time.monotonic()  # the lease runs from the request, not the answer
        held = [k for k, r in self.runners.items() if not r.lost]
        try:
            lost = await self.store.renew(held, self.id, self.s.lease_s)
        except self.store.errors as exc:
            if not self._renew_failing:
                log.warning("lease renewal failed (%s); engines stop in %.0fs unless it "
                            "recovers", exc, self.s.fence_after_s() - (sent - self._last_renewed))
            self._renew_failing = True
            return
        if self._renew_failing:
            log.info("lease renewal restored")
        self._renew_failing = False
        self._last_renewed = sent
        if self.fenced:
            self.fenced = False
            self._wake.set()
        for key in lost:  # before anything else that may fail
            runner = self.runners.get(key)
            if runner is not None and not runner.lost:
                log.error("claim on replica %s/%d lost (lease lapsed): stopping it", *key)
                runner.lost = True
                runner.stop(drain=False, timeout_s=self._fence_stop_s())
        with contextlib.suppress(*self.store.errors):
            # Rewritten every time (fenced by the claim): a write lost in a blip heals.
            for runner in list(self.runners.values()):
                if not runner.lost:
                    await self.store.write_status(runner.status, self.id)
            await self.store.write_host(self.host_record(), self.s.lease_s)

    def _fence_stop_s(self) -> float:
        return self.s.fence_margin() / 2

    async def _fence_loop(self) -> None:
        """Stop every engine when the leases may lapse: renewals failing for lease - margin."""
        while not self._stopping.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=0.1)
            silent = time.monotonic() - self._last_renewed
            if self.runners and silent >= self.s.fence_after_s() and not self.fenced:
                log.error("no lease renewal for %.1fs (lease %.0fs): stopping all %d engine(s) "
                          "so that no replica runs twice", silent, self.s.lease_s,
                          len(self.runners))
                self.fenced = True
                for runner in self.runners.values():
                    runner.lost = True  # another host may own it by the time we are back
                    runner.stop(drain=False, timeout_s=self._fence_stop_s())

    # --- reconcile ---------------------------------------------------------------------

    async def _reconcile_loop(self) -> None:
        after = "0-0"  # if the newest id cannot be read, old notices only cost one pass
        with contextlib.suppress(*self.store.errors):
            after = await self.store.last_notice_id()
        notices = asyncio.create_task(self._notice_loop(after))
        try:
            while not self._stopping.is_set():
                self._wake.clear()
                try:
                    if not self._adoption_done:
                        await self.adopt_or_stop()
                    if not self.fenced:
                        await self.reconcile()
                except self.store.errors as exc:
                    log.warning("reconcile failed: %s", exc)
                except NvmlUnavailable:
                    pass  # logged; try again next time
                except Exception:  # a bug must not stop reconciling for good
                    log.exception("reconcile failed unexpectedly")
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.s.reconcile_interval_s)
        finally:
            await cancel_and_wait(notices)

    async def _notice_loop(self, after: str) -> None:
        """Wake the reconcile loop on each change notice (only a hint: the periodic pass
        converges anyway)."""
        while True:
            try:
                # Block for less than the socket timeout, or every read times out.
                newest = await self.store.wait_notice(
                    after, min(self.s.reconcile_interval_s, self._socket_timeout_s / 2))
            except self.store.errors:
                await asyncio.sleep(1.0)
                continue
            if newest != after:
                after = newest
                self._wake.set()

    async def reconcile(self) -> None:
        found, unreadable = await self.store.read_all()
        deployments = {d.id: d for d in found}
        for key, runner in list(self.runners.items()):
            if key[0] in unreadable:
                continue  # stored by a newer or broken writer: not a reason to stop
            dep = deployments.get(key[0])
            if (dep is None or dep.deleting or key[1] >= dep.spec.replicas
                    or dep.uid != runner.deployment.uid):
                runner.stop(drain=True)
            else:
                runner.observe(dep)
        for dep in sorted(deployments.values(), key=lambda d: d.created_at):
            if dep.deleting:
                await self.store.finalize(dep)
            else:
                await self._claim_missing(dep)

    async def _claim_missing(self, dep: Deployment) -> None:
        claims = await self.store.claims(dep)
        statuses = await self.store.statuses(dep)
        for index in range(dep.spec.replicas):
            if self._stopping.is_set() or self.fenced:
                return
            if (dep.id, index) in self.runners or (index < len(claims) and claims[index]):
                continue
            status = statuses[index] if index < len(statuses) else None
            if not self._may_try(dep, status):
                continue
            view, entries = await self._host_view()
            where = place(dep.spec, view, self.table)
            if isinstance(where, str):
                log.debug("replica %s/%d not for this host: %s", dep.id, index, where)
                continue
            delay = load_fraction(view) * CLAIM_DELAY_PER_LOAD_S
            if delay:
                await asyncio.sleep(delay)
            if not await self.store.claim(dep, index, self.id, self.s.lease_s):
                continue  # taken meanwhile, or no longer wanted
            await self._start(dep, index, where, status, entries)

    def _may_try(self, dep: Deployment, status: ReplicaStatus | None) -> bool:
        """A replica Failed in this generation is not retried here, nor anywhere once it
        has failed on max_failed_hosts hosts."""
        if status is None or status.state != "Failed" or status.generation != dep.generation:
            return True
        return (self.id not in status.failed_hosts
                and len(status.failed_hosts) < self.s.max_failed_hosts)

    async def _start(self, dep: Deployment, index: int, where: Selection,
                     previous: ReplicaStatus | None, entries: list[LaunchEntry],
                     adopt: LaunchEntry | None = None) -> bool:
        """Run a replica we hold the claim of; False (claim released) if this host will
        not run it."""
        refusal = self.allow.refusal(dep.spec)
        if refusal is not None:
            log.warning("refusing replica %s/%d: %s", dep.id, index, refusal)
            failed = list(previous.failed_hosts) if previous and (
                previous.generation == dep.generation) else []
            status = ReplicaStatus(
                deployment=dep.id, index=index, state="Failed", host=self.id,
                last_error=f"refused by {self.id}: {refusal}", since=time.time(),
                generation=dep.generation, failed_hosts=[*failed, self.id])
            await self.store.release(dep.id, index, self.id, status)
            return False
        port = adopt.port if adopt is not None else self._free_port(entries)
        if port is None:  # a passing shortage here, not a failure of the replica
            log.warning("no free port in --port-range %s for replica %s/%d",
                        self.s.port_range, dep.id, index)
            await self.store.release(dep.id, index, self.id)
            return False
        runner = ReplicaRunner(self.s, dep, index, where, port, self.state,
                               report=lambda st: self.store.write_status(st, self.id),
                               advertise_host=self.advertise_host, previous=previous,
                               adopt=adopt)
        self.runners[(dep.id, index)] = runner
        log.info("replica %s/%d (%s) placed here: port %d, GPUs %s", dep.id, index,
                 dep.spec.served_name, port, ",".join(map(str, where.indices)) or "none")
        self._tasks[(dep.id, index)] = asyncio.create_task(self._run_replica(runner))
        self._host_changed.set()
        return True

    async def _run_replica(self, runner: ReplicaRunner) -> None:
        key = runner.key
        outcome: Outcome | None = None
        try:
            outcome = await runner.run()
        except Exception:
            log.exception("replica %s/%d: unexpected error", *key)
        finally:
            self.runners.pop(key, None)
            self._tasks.pop(key, None)
            self._host_changed.set()
        if runner.lost:
            # Lost or fenced: release only if, Redis back in time, the claim is still
            # ours (the script checks), keeping the status (shown as lost) as it is.
            with contextlib.suppress(*self.store.errors):
                await self.store.release(*key, self.id)
            self._wake.set()
            return
        try:
            if outcome is not None and outcome.failed:
                await self.store.release(*key, self.id, outcome.status)
            else:
                await self.store.release(*key, self.id, delete_status=True)
            dep = await self.store.get(key[0])
            if dep is not None and dep.deleting:
                await self.store.finalize(dep)
        except self.store.errors as exc:  # the lease lapses by itself
            log.warning("could not release replica %s/%d: %s", *key, exc)
        self._wake.set()

    # --- engines from an earlier run ---------------------------------------------------

    async def adopt_or_stop(self) -> None:
        """Engines an earlier run of this agent started: adopt those whose replica is
        still wanted (same creation) and whose claim we can keep or take again; stop the
        rest at once, in parallel (none stays orphaned). Retried each pass until done."""
        entries = await asyncio.to_thread(self.state.entries)
        leftovers = [e for e in entries if e.agent == self.id and e.deployment is not None
                     and e.replica is not None and e.state == "orphaned"
                     and (e.deployment, e.replica) not in self.runners]
        stops = [e for e in leftovers if not await self._try_adopt(e, entries)]
        await asyncio.gather(*(self._stop_leftover(e) for e in stops))
        self._adoption_done = True

    async def _try_adopt(self, entry: LaunchEntry, entries: list[LaunchEntry]) -> bool:
        assert entry.deployment is not None and entry.replica is not None
        dep = await self.store.get(entry.deployment)
        if dep is None or dep.uid != entry.deployment_uid:
            return False
        # The claim script keeps our claim (or takes a lapsed one) only if the replica
        # is still wanted, in one step: no window for another host.
        if not await self.store.claim(dep, entry.replica, self.id, self.s.lease_s):
            return False
        statuses = await self.store.statuses(dep)
        status = statuses[entry.replica] if entry.replica < len(statuses) else None
        selection = Selection(list(entry.gpu_indices), list(entry.gpus))
        return await self._start(dep, entry.replica, selection, status, entries, adopt=entry)

    async def _stop_leftover(self, entry: LaunchEntry) -> None:
        assert entry.deployment is not None and entry.replica is not None
        log.info("stopping engine %s of replica %s/%d left by an earlier run",
                 entry.id, entry.deployment, entry.replica)
        await stop_orphan(entry, log.warning)
        await asyncio.to_thread(self.state.remove, entry.id)
        # Ours still (scaled away while we were down): release it for good.
        await self.store.release(entry.deployment, entry.replica, self.id, delete_status=True)

    # --- run ---------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        log.info("agent %s: store %s, labels %s, %s", self.id, redact(self.s.registry or ""),
                 self.s.host_labels(), f"up to {self.s.max_engines} engine(s), no GPUs"
                 if self.s.gpus == "none" else f"GPUs {self.s.gpus}")
        if not self.advertise_host:
            self.advertise_host = await asyncio.to_thread(socket.getfqdn) or socket.gethostname()
        try:
            await self._host_view()
        except NvmlUnavailable as exc:
            print(f"deepinfer-engine agent: {exc}; use --gpus none --max-engines N on a "
                  "host without GPUs", file=sys.stderr)
            return 2
        self._last_renewed = time.monotonic()
        heartbeat = asyncio.create_task(self._heartbeat_loop())
        others = [asyncio.create_task(self._fence_loop()),
                  asyncio.create_task(self._reconcile_loop())]
        try:
            await self._stopping.wait()
        finally:
            log.info("stopping: draining %d replica(s)", len(self.runners))
            for task in others:
                await cancel_and_wait(task)
            # Leases keep being renewed while the replicas drain, then go with the host.
            await self._shutdown()
            await cancel_and_wait(heartbeat)
            with contextlib.suppress(*self.store.errors):
                await self.store.delete_host(self.id)
            await self.redis.aclose()
        return 0

    async def _shutdown(self) -> None:
        for runner in list(self.runners.values()):
            runner.stop(drain=True)
        tasks = list(self._tasks.values())
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


async def stop_orphan(entry: LaunchEntry, log_warning: Callable[[str], None]) -> None:
    """Stop an engine nobody supervises: its process group (SIGTERM, SIGKILL after its
    stop timeout) and, for a container, the container."""
    if entry.pgid and not leader_reused(entry):
        await stop_unsupervised_group(entry.pgid, entry.stop_timeout_s)
    name = container_of(entry.command)
    if name is not None:
        await run_bounded(docker_rm_argv(name), 10.0, log_warning)


def run_agent(s: AgentSettings) -> int:
    configure_logging(s.log_level)
    try:
        agent = Agent(s)
    except (OSError, ValueError, KeyError) as exc:
        print(f"deepinfer-engine agent: cannot start: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(agent.run())
