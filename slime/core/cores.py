"""Cores: how many threads each rollout engine and each trainer rank runs, and the claims that let
them share a machine. The one place that knows about thread budgets.

On a CPU machine the engines and the trainer ranks share the cores. `threads_per_worker` and
`threads_per_rank` at 0 (auto) follow the mode: a synchronous run (max_staleness 0) never generates
while it trains, so each phase gets the whole machine; an asynchronous one generates beside training,
so the engines hold half the cores while they have work and a trainer rank takes every core they
do not claim, rechecked before each forward.

Claims: a rollout worker with episodes in flight keeps a `CoreClaim`, one file holding its engine's
thread count in its node's claims folder (`claims_dir`, per Ray node and job, in /dev/shm); a trainer
rank's `CoreShare` sums the claims before each forward. The controller removes its node's folder
when the run ends (`remove_claims`); a worker on another node removes its own once it is empty.
docs/benchmarks.md has the measurements behind the split.

Nothing here imports torch or Ray at module import.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import Any

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


def thread_env(threads: int) -> dict[str, str]:
    """The environment variables that give a process `threads` OpenMP/MKL threads (read once, when
    its OpenMP pool starts: set them in the environment a process starts with)."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def set_thread_budget(threads: int) -> None:
    """Pin torch/OpenMP threads for this whole process, and for processes it spawns later through
    the environment: two busy processes on two cores with torch's default count ran several times
    slower (docs/benchmarks.md)."""
    import torch

    os.environ.update(thread_env(threads))
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------ claims
def claims_dir(node_id: str, job_id: str) -> str:
    """The folder where busy rollout engines of Ray job `job_id` on node `node_id` claim their
    threads. Job ids restart at 1 in every Ray cluster, so the node id (unique per cluster and node)
    keeps two runs on one machine apart."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else "/tmp"
    return os.path.join(base, f"slime-cores-{node_id[:16]}-{job_id}")


def ray_claims_dir() -> str | None:
    """This process's node's claims folder for its Ray job (None outside Ray)."""
    try:
        import ray
    except ImportError:
        return None
    if not ray.is_initialized():
        return None
    ctx = ray.get_runtime_context()
    return claims_dir(ctx.get_node_id(), ctx.get_job_id())


def remove_claims() -> None:
    """Remove this node's claims folder of this Ray job (the controller, when the run ends: claims of
    workers that died without withdrawing them)."""
    folder = ray_claims_dir()
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


class CoreClaim:
    """One rollout worker's claim on its node's cores: a file holding its engine's thread count,
    present while `claim()`ed. `path` None (outside Ray) claims nothing."""

    def __init__(self, path: str | None, threads: int) -> None:
        self.path = path
        self.threads = threads

    @classmethod
    def for_worker(cls, index: int, threads: int) -> CoreClaim:
        """Worker `index`'s claim in its node's claims folder (a claim of nothing outside Ray)."""
        folder = ray_claims_dir()
        return cls(None if folder is None else os.path.join(folder, f"worker{index}"), threads)

    def claim(self) -> None:
        if self.path is not None:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(self.path, "w", encoding="ascii") as f:
                f.write(str(self.threads))

    def release(self) -> None:
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)

    def close(self) -> None:
        """Release, and remove the claims folder once it is empty: on a node other than the driver's
        nothing else would (the controller clears its own node's folder)."""
        self.release()
        if self.path is not None:
            with contextlib.suppress(OSError):  # not empty: another worker still claims, and cleans up
                os.rmdir(os.path.dirname(self.path))


class CoreShare:
    """Auto threads for a trainer rank: the cores that busy rollout engines on this node do not claim.

    `adjust()` sums the claims in `claims_dir` and sets this thread's torch intra-op threads to
    `trainer_threads(0, num_ranks, cores, claimed)`: in a synchronous run the engines are idle while
    the trainer trains, so the rank gets the whole machine; in an asynchronous one it gets the
    engines' cores back as soon as they run out of work. OpenMP thread counts are per calling thread,
    so `adjust` must run on the thread that runs the forward and backward.
    """

    def __init__(self, cores: int, num_ranks: int, claims_dir: str | None) -> None:
        self.cores = cores
        self.num_ranks = num_ranks
        self.claims_dir = claims_dir
        self.threads = 0  # as last set

    @classmethod
    def in_this_process(cls, num_ranks: int) -> CoreShare:
        """The share of a rank in this process: the Ray cluster's cores (this machine's outside Ray)
        and its node's claims folder."""
        return cls(available_cores(_ray_cpus()), num_ranks, ray_claims_dir())

    def claimed(self) -> int:
        """Threads the busy engines claim now (0 without a claims folder)."""
        if self.claims_dir is None:
            return 0
        total = 0
        try:
            entries = list(os.scandir(self.claims_dir))
        except FileNotFoundError:
            return 0
        for entry in entries:
            try:
                with open(entry.path, encoding="ascii") as f:
                    total += int(f.read() or 0)
            except (FileNotFoundError, ValueError):  # released, or being written, just now
                continue
        return total

    def before_forward(self, *_: Any) -> None:
        """A forward pre-hook (returns None, so the inputs stay as they are)."""
        self.adjust()

    def adjust(self) -> int:
        """Set this thread's torch threads to the cores not claimed now; returns the count."""
        import torch

        threads = trainer_threads(0, self.num_ranks, self.cores, self.claimed())
        if threads != self.threads:
            torch.set_num_threads(threads)
            self.threads = threads
        return threads


def _ray_cpus() -> int:
    """The CPUs of the Ray cluster this process runs in (0 outside Ray)."""
    try:
        import ray
    except ImportError:
        return 0
    return int(ray.cluster_resources().get("CPU", 0)) if ray.is_initialized() else 0
