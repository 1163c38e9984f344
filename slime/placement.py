"""Placement: every actor's resource request checked against the Ray cluster before any actor starts,
and an actor Ray still cannot place named within seconds, instead of a run that waits forever.

    plan(cfg, nodes)      the run's requests (rollout workers, trainer ranks) fitted onto the nodes
                          (first fit, largest first); on a local cluster with fewer CPUs than actors
                          each actor's CPU request becomes an equal share (the engines and ranks share
                          the cores anyway: their thread budgets are slime/core/cores.py's); a request
                          that cannot fit raises ValueError naming it, what it asks and what there is
    watch(...)            while actors start, every `every_s` seconds: which of them Ray has not started
                          yet (not placed, or its process still starting), what they ask for and what
                          the cluster has free; a warning after three rounds, an error past `timeout_s`

Ray's CPU and GPU resources are bookkeeping for placement only (slime sets each process's threads
itself), which is why sharing a core between actors is a sensible default on a small machine and
not on a cluster someone else sized (`ray.address` set: requests are kept as configured).
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

from slime.core.config import SlimeConfig

log = logging.getLogger("slime")


@dataclass(frozen=True)
class Request:
    """One actor's resources."""

    actor: str  # e.g. "RolloutWorker 1"
    cpus: float
    gpus: float


def requests(cfg: SlimeConfig) -> list[Request]:
    """What the run's actors ask Ray for (the replay buffer asks for nothing)."""
    out = [
        Request(f"RolloutWorker {i}", cfg.rollout.num_cpus_per_worker, cfg.rollout.gpus_per_worker)
        for i in range(0 if cfg.buffer.replay_path else cfg.rollout.num_workers)
    ]
    out += [
        Request(f"TrainerRank {r}", cfg.trainer.num_cpus_per_rank, cfg.trainer.gpus_per_rank)
        for r in range(cfg.trainer.num_ranks)
    ]
    return out


def fit(reqs: list[Request], nodes: list[dict[str, float]]) -> str | None:
    """Place `reqs` on `nodes` (each a node's {"CPU": .., "GPU": ..}), largest first, each on the first
    node with room; None when all fit, else why the first one that does not fit cannot."""
    free = [{"CPU": float(n.get("CPU", 0.0)), "GPU": float(n.get("GPU", 0.0))} for n in nodes]
    for req in sorted(reqs, key=lambda r: (r.gpus, r.cpus), reverse=True):
        for node in free:
            if node["CPU"] + 1e-9 >= req.cpus and node["GPU"] + 1e-9 >= req.gpus:
                node["CPU"] -= req.cpus
                node["GPU"] -= req.gpus
                break
        else:
            total_cpu = sum(float(n.get("CPU", 0.0)) for n in nodes)
            total_gpu = sum(float(n.get("GPU", 0.0)) for n in nodes)
            asked_cpu = sum(r.cpus for r in reqs)
            asked_gpu = sum(r.gpus for r in reqs)
            return (
                f"Ray cannot place {req.actor} (CPU {req.cpus:g}, GPU {req.gpus:g}): the actors ask for "
                f"CPU {asked_cpu:g} and GPU {asked_gpu:g} in all, the cluster has CPU {total_cpu:g} and "
                f"GPU {total_gpu:g} on {len(nodes)} node(s) (largest node: CPU "
                f"{max((float(n.get('CPU', 0.0)) for n in nodes), default=0.0):g}). Lower "
                "rollout.num_workers / trainer.num_ranks or rollout.num_cpus_per_worker / "
                "trainer.num_cpus_per_rank (fractions share a core), or add nodes"
            )
    return None


def plan(cfg: SlimeConfig, nodes: list[dict[str, float]]) -> SlimeConfig:
    """`cfg` with CPU requests that fit `nodes`, or ValueError (see the module docstring)."""
    reqs = requests(cfg)
    if fit(reqs, nodes) is None:
        return cfg
    cluster_cpus = sum(float(n.get("CPU", 0.0)) for n in nodes)
    asked = sum(r.cpus for r in reqs)
    if not cfg.ray.address and len(nodes) == 1 and asked > cluster_cpus > 0:
        share = cluster_cpus / asked
        shared = copy.copy(cfg)  # a shallow copy: only the two sections below change
        rollout, trainer = cfg.rollout, cfg.trainer
        shared.rollout = dataclasses.replace(rollout, num_cpus_per_worker=rollout.num_cpus_per_worker * share)
        shared.trainer = dataclasses.replace(trainer, num_cpus_per_rank=trainer.num_cpus_per_rank * share)
        if fit(requests(shared), nodes) is None:
            log.info(
                "placement: %d actors ask for %g CPUs of this machine's %g: they share the cores "
                "(rollout.num_cpus_per_worker=%.3g, trainer.num_cpus_per_rank=%.3g)",
                len(reqs),
                asked,
                cluster_cpus,
                shared.rollout.num_cpus_per_worker,
                shared.trainer.num_cpus_per_rank,
            )
            return shared
    raise ValueError(fit(reqs, nodes))


def cluster_nodes() -> list[dict[str, float]]:
    """The live nodes' resources of the Ray cluster this process is connected to."""
    import ray

    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def pending_actors() -> list[str]:
    """Class names of this job's actors Ray has not placed yet."""
    import ray
    from ray._private import state

    job = ray.get_runtime_context().get_job_id()
    return sorted(
        a["ActorClassName"].rsplit(".", 1)[-1]
        for a in state.actors().values()
        if a.get("State") == "PENDING_CREATION" and a.get("JobID") == job
    )


async def watch(starting: Awaitable[Any], reqs: list[Request], every_s: float, timeout_s: float) -> Any:
    """Await `starting` (the actors' start-up calls); every `every_s` seconds that some actor is still
    waiting for Ray to place it, log which and what it asks; past `timeout_s` of such waiting, raise
    RuntimeError with the same. Returns what `starting` returns."""
    import ray

    task = asyncio.ensure_future(starting)
    waited = 0.0
    while True:
        done, _ = await asyncio.wait([task], timeout=every_s)
        if done:
            return task.result()
        pending = pending_actors()
        if not pending:
            waited = 0.0
            continue
        waited += every_s
        asks = {r.actor.split()[0]: r for r in reqs}
        parts = [
            f"{name} (CPU {asks[name].cpus:g}, GPU {asks[name].gpus:g})" if name in asks else name
            for name in pending
        ]
        free = ray.available_resources()
        message = (
            f"Ray has not started {', '.join(parts)} after {waited:g}s; the cluster has CPU "
            f"{free.get('CPU', 0.0):g} and GPU {free.get('GPU', 0.0):g} free"
        )
        if waited >= timeout_s:
            task.cancel()
            raise RuntimeError(f"{message} (ray.placement_timeout_s={timeout_s:g})")
        # Starting an actor's process takes a while on a busy machine: a note first, then a warning.
        log.log(logging.WARNING if waited >= 3 * every_s else logging.INFO, "%s", message)
