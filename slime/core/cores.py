"""Thread budgets: how many threads each rollout engine and each trainer rank runs.

On a CPU machine the engines and the trainer ranks share the cores. `threads_per_worker` and
`threads_per_rank` at 0 (auto) follow the mode: a synchronous run (max_staleness 0) never generates
while it trains, so each phase gets the whole machine; an asynchronous one generates beside training,
so the engines hold half the cores while they have work and a trainer rank takes every core they
do not claim, rechecked before each forward (busy engines leave a claim file in `core_claims_dir`).
docs/benchmarks.md has the measurements behind the split.
"""

from __future__ import annotations

import os

from slime.core.config import RolloutConfig


def available_cores(ray_num_cpus: int = 0) -> int:
    """Cores this process may run on (its CPU affinity), capped at `ray_num_cpus` when that is set."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(cores, ray_num_cpus) if ray_num_cpus > 0 else cores


def engine_threads(rollout: RolloutConfig, max_staleness: int, cores: int) -> int:
    """`rollout.threads_per_worker`, with 0 (auto) resolved for a machine of `cores` cores: all of
    them shared by the workers when synchronous, half of them when asynchronous; at least one each."""
    if rollout.threads_per_worker:
        return rollout.threads_per_worker
    share = cores if max_staleness == 0 else cores // 2
    return max(1, share // rollout.num_workers)


def trainer_threads(threads_per_rank: int, num_ranks: int, cores: int, claimed: int) -> int:
    """A rank's threads: `threads_per_rank`, or for 0 (auto) the `cores` that busy engines do not
    claim (`claimed` threads in all), shared by the `num_ranks` ranks; at least one."""
    if threads_per_rank:
        return threads_per_rank
    return max(1, (cores - claimed) // num_ranks)


def core_claims_dir(node_id: str, job_id: str) -> str:
    """The folder where busy rollout engines of Ray job `job_id` on node `node_id` claim their
    threads: one file per worker holding its thread count, present only while the worker has
    episodes in flight. Job ids restart at 1 in every Ray cluster, so the node id (unique per
    cluster and node) keeps two runs on one machine apart."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else "/tmp"
    return os.path.join(base, f"slime-cores-{node_id[:16]}-{job_id}")
