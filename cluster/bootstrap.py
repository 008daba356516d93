"""Put a validated config onto Ray: actor classes, options, names, placement, restarts.

Names derive from the state dir (``namespace_for``) so two clusters on one machine, or two
test runs sharing one Ray, never collide.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from actors.batching import BatchPolicy
from actors.clocks import ClockSpec
from actors.coordinator import FlowPolicy, TenantPolicy
from actors.ingress import TenantAuth
from actors.ledger import shard_ledger_url
from actors.sharding import CoordinatorShards, shard_of, split_share
from actors.worker import FlowTarget
from cluster.actors_remote import (
    CoordinatorActor,
    HostActor,
    IngressActor,
    SupervisorActor,
    WorkerActor,
)
from cluster.config import BatchDelivery, ClusterConfig, FlowConfig
from cluster.handles import ActorRecipe, RayCoordinatorHandle, RayHandle, RayWorkerHandle

INGRESS_SUBMIT_TIMEOUT = 5.0
HOST_SUBMIT_TIMEOUT = 30.0
# Actors hold no CPU: thousands of clocks share a few processes and flows run on threads.
# Task events (the dashboard's per-call timeline) are off: at hundreds of runs/s they grow the
# GCS by ~1.7 MB/s up to Ray's cap and cost every call a report.
COMMON = {
    "num_cpus": 0,
    "lifetime": "detached",
    "max_restarts": -1,
    "enable_task_events": False,
}


def namespace_for(state_dir: Path) -> str:
    digest = hashlib.sha1(str(Path(state_dir).resolve()).encode()).hexdigest()[:12]
    return f"listeners-{digest}"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def partition(specs: list[ClockSpec], per_host: int) -> list[list[ClockSpec]]:
    """Clocks to hosts: at most ``per_host`` each, at least one host (it may hold none)."""
    groups = [specs[i : i + per_host] for i in range(0, len(specs), per_host)]
    return groups or [[]]


@dataclass
class Deployment:
    """Handles of one running cluster's actors."""

    namespace: str
    coordinator: CoordinatorShards
    supervisor: RayHandle
    ingress: RayHandle
    hosts: list[RayHandle]
    workers: list[RayWorkerHandle]
    ingress_port: int
    actors: list[Any] = field(default_factory=list)

    def all_handles(self) -> list[RayHandle]:
        return [*self.hosts, self.ingress, self.supervisor, *self.coordinators, *self.workers]

    @property
    def coordinators(self) -> list[RayCoordinatorHandle]:
        """The coordinator shards (one unless ``coordinator_shards`` says more)."""
        return list(self.coordinator.shards)


def _spawn(
    cls: type, name: str, namespace: str, *args: Any, **options: Any
) -> tuple[Any, ActorRecipe]:
    """Create a named actor; the recipe lets the supervisor create it again if Ray gives up."""
    recipe = ActorRecipe(cls, name, namespace, {**COMMON, **options}, args)
    return recipe.spawn(), recipe


FORWARDED_ENV_PREFIXES = ("AWS_",)


def source_env(specs: list[ClockSpec]) -> dict[str, str]:
    """Environment the hosts' clocks read credentials from, forwarded from the driver:
    boto3's ``AWS_*`` variables and every variable a clock names in a ``*_env`` option."""
    wanted = {str(v) for spec in specs for k, v in spec.options.items() if k.endswith("_env")}
    return {
        k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES) or k in wanted
    }


def shard_plan(config: ClusterConfig) -> list[tuple[str, list[FlowPolicy], list[TenantPolicy]]]:
    """Each coordinator shard's name, flows and tenant policies. A flow belongs to the shard
    of ``shard_of(tenant, flow)``; a tenant's concurrency and event-rate quotas are split
    across the shards that hold its flows, in proportion to how many they hold."""
    n = config.cluster.coordinator_shards
    flows_of: list[list[FlowConfig]] = [[] for _ in range(n)]
    for f in config.flows:
        flows_of[shard_of(f.tenant, f.name, n)].append(f)
    per_tenant = {
        t.name: sum(1 for f in config.flows if f.tenant == t.name) for t in config.all_tenants()
    }
    plan = []
    for i, flows in enumerate(flows_of):
        tenants = []
        for t in config.all_tenants():
            mine = sum(1 for f in flows if f.tenant == t.name)
            whole = per_tenant[t.name]
            tenants.append(
                TenantPolicy(
                    t.name,
                    split_share(t.quotas.max_concurrent_runs, mine, whole),
                    split_share(t.quotas.max_events_per_second, mine, whole),
                    split_share(t.quotas.max_pending_runs, mine, whole),
                )
            )
        name = "coordinator" if n == 1 else f"coordinator-{i}"
        plan.append((name, [flow_policy(f) for f in flows], tenants))
    return plan


def flow_policy(f: FlowConfig) -> FlowPolicy:
    batch = None
    if isinstance(f.delivery, BatchDelivery):
        batch = BatchPolicy(f.delivery.max_events, f.delivery.max_wait)
    return FlowPolicy(f.tenant, f.name, f.retries, f.retry_delay, batch=batch)


def flow_targets(config: ClusterConfig, flow_objs: dict[str, Any] | None) -> list[FlowTarget]:
    objs = flow_objs or {}
    return [
        FlowTarget(
            tenant=f.tenant,
            flow=f.name,
            event_parameter=f.event_parameter,
            entrypoint=None if f.ref in objs else f.entrypoint,
            base_dir=str(config.base_dir),
            flow_obj=objs.get(f.ref),
        )
        for f in config.flows
    ]


def deploy(
    config: ClusterConfig,
    *,
    tracking: str,
    worker_env: dict[str, str],
    admin_token: str,
    flow_objs: dict[str, Any] | None = None,
) -> Deployment:
    """Create every actor of the cluster (the caller has initialised Ray)."""
    c = config.cluster
    ns = namespace_for(config.state_path)
    state_dir = str(config.state_path)
    targets = flow_targets(config, flow_objs)
    workers = []
    for i in range(c.workers):
        actor, recipe = _spawn(
            WorkerActor,
            f"worker-{i}",
            ns,
            i,
            targets,
            tracking,
            c.worker_concurrency,
            state_dir,
            c.tracked_concurrency,
            runtime_env={"env_vars": worker_env},
            scheduling_strategy="SPREAD",  # on a multi-node Ray, one per node where possible
        )
        workers.append(RayWorkerHandle(f"worker-{i}", actor, recipe=recipe))
    shards = shard_plan(config)
    coordinators: list[RayCoordinatorHandle] = []
    actors_of_shards: list[Any] = []
    for i, (name, flows, tenants) in enumerate(shards):
        coord_actor, coord_recipe = _spawn(
            CoordinatorActor,
            name,
            ns,
            shard_ledger_url(config.ledger_url, i, len(shards)),
            state_dir,
            c.synchronous,
            workers,
            flows,
            tenants,
            max(1, -(-c.worker_concurrency // len(shards))),
            max_task_retries=-1,
        )
        coordinators.append(RayCoordinatorHandle(name, coord_actor, 30.0, coord_recipe))
        actors_of_shards.append(coord_actor)
    coordinator = CoordinatorShards(coordinators)

    def router(timeout: float) -> CoordinatorShards:
        return CoordinatorShards(
            [
                RayCoordinatorHandle(name, actor, timeout, namespace=ns)
                for (name, _, _), actor in zip(shards, actors_of_shards, strict=True)
            ]
        )

    host_coord = router(HOST_SUBMIT_TIMEOUT)
    host_specs: dict[str, list[ClockSpec]] = {}
    hosts = []
    specs = config.clock_specs()
    host_env = source_env(specs)
    for i, group in enumerate(partition(specs, c.clocks_per_host)):
        name = f"host-{i}"
        host_specs[name] = group
        actor, recipe = _spawn(
            HostActor,
            name,
            ns,
            name,
            group,
            state_dir,
            host_coord,
            host_env,
            max_task_retries=-1,
            scheduling_strategy="SPREAD",
        )
        hosts.append(RayHandle(name, actor, 30.0, recipe))
    port = c.ingress.port or free_port(c.ingress.host)
    sup_actor, _ = _spawn(
        SupervisorActor,
        "supervisor",
        ns,
        coordinator,
        hosts,
        workers,
        host_specs,
        c.heartbeat_seconds,
        max_task_retries=-1,
    )
    supervisor = RayHandle("supervisor", sup_actor, timeout=30.0, namespace=ns)
    ingress_actor, ingress_recipe = _spawn(
        IngressActor,
        "ingress",
        ns,
        [(f.tenant, f.name) for f in config.flows],
        [TenantAuth(t.name, config.token_for(t.name)) for t in config.all_tenants()],
        router(INGRESS_SUBMIT_TIMEOUT),
        supervisor,
        {
            "admin_token": admin_token,
            "host": c.ingress.host,
            "port": port,
            "max_payload_bytes": c.max_payload_bytes,
        },
        max_task_retries=-1,
    )
    ingress = RayHandle("ingress", ingress_actor, 30.0, ingress_recipe)
    return Deployment(ns, coordinator, supervisor, ingress, hosts, workers, port)


async def start_deployment(d: Deployment) -> None:
    """Start the actors in dependency order (each ``start`` is idempotent)."""
    await asyncio.gather(*(w.call("start") for w in d.workers))
    await asyncio.gather(*(c.call("start") for c in d.coordinators))
    await asyncio.gather(*(h.call("start") for h in d.hosts))
    await d.ingress.call("start")
    # The supervisor watches the ingress too, now that it is up.
    await d.supervisor.call("watch", d.ingress)
    await d.supervisor.call("start")


async def clock_states(d: Deployment) -> list[dict[str, Any]]:
    states: list[dict[str, Any]] = []
    for host in d.hosts:
        states.extend(await host.call("clocks"))
    return states


async def stop_deployment(d: Deployment, drain_timeout: float = 30.0) -> None:
    """Stop intake, drain runs, then kill every actor (none may outlive ``down``)."""
    steps = [
        *(h.call("stop") for h in d.hosts),
        d.ingress.call("stop"),
        d.supervisor.call("stop"),
    ]
    await asyncio.gather(*steps, return_exceptions=True)
    await asyncio.gather(
        *(c.call("stop", drain_timeout, timeout=drain_timeout + 5) for c in d.coordinators),
        return_exceptions=True,
    )
    await asyncio.gather(
        *(w.call("stop", 10.0, timeout=20.0) for w in d.workers), return_exceptions=True
    )
    kill_namespace_actors(d.namespace, [h.actor for h in d.all_handles()])


def kill_namespace_actors(namespace: str, known: list[Any] | None = None) -> int:
    """Kill the cluster's actors: the given handles plus any named one left in the namespace."""
    killed = 0
    handles = list(known or [])
    for info in ray.util.list_named_actors(all_namespaces=True):
        if info.get("namespace") == namespace:
            try:
                handles.append(ray.get_actor(info["name"], namespace=namespace))
            except ValueError:
                continue
    for handle in handles:
        try:
            ray.kill(handle, no_restart=True)
            killed += 1
        except Exception:
            continue
    return killed
