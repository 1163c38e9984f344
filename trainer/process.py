"""A trainer rank's process: its environment, process group and collectives (its thread budget:
slime/core/cores.py).

Nothing here writes `os.environ` at import. What a rank needs as environment variables before torch
or DeepSpeed start (OpenMP's thread count, DeepSpeed's accelerator, LOCAL_RANK) reaches its Ray actor
through the actor's `runtime_env` (`rank_env`); the rendezvous goes through a `tcp://` init method
instead of MASTER_* variables. DeepSpeed reads LOCAL_RANK from the environment (there is no
argument for it) when it builds a model and, under ZeRO-3, in every forward: a rank running
in-process without one (tests, benchmarks) sets it for its lifetime only (`local_rank_env`).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from typing import Any

import torch

from slime.core.config import TrainerConfig
from slime.core.cores import available_cores, trainer_threads


def rank_env(trainer_cfg: TrainerConfig, rank: int) -> dict[str, str]:
    """Environment variables for rank `rank`'s Ray actor (its `runtime_env`): the thread budget, which
    OpenMP reads once when its pool starts; LOCAL_RANK (Ray gives each GPU rank its own visible
    device, so 0 there); and the CPU accelerator when the rank has no GPU (DeepSpeed otherwise probes
    for one and warns on stdout)."""
    threads = str(trainer_threads(trainer_cfg.threads_per_rank, trainer_cfg.num_ranks, available_cores(), 0))
    cpu = trainer_cfg.gpus_per_rank <= 0
    env = {
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "TOKENIZERS_PARALLELISM": "false",
        "LOCAL_RANK": str(rank if cpu else 0),
    }
    if cpu:
        env["DS_ACCELERATOR"] = "cpu"
    return env


def free_port() -> int:
    """A TCP port that was free a moment ago (for the process group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def node_ip() -> str:
    """This node's address as other nodes see it: Ray's node IP inside a Ray worker, else the
    address of the outgoing interface (127.0.0.1 when there is no network)."""
    try:
        import ray

        if ray.is_initialized():
            return str(ray.util.get_node_ip_address())
    except ImportError:
        pass
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # no packet is sent; picks the outgoing interface
            return str(s.getsockname()[0])
    except OSError:
        return "127.0.0.1"


@contextlib.contextmanager
def local_rank_env(local_rank: int) -> Iterator[None]:
    """LOCAL_RANK for as long as the context is open (a rank holds it from `setup` to `close`).
    A value that is already there (from `rank_env` or a launcher) is kept and left alone; otherwise
    the variable is removed again on exit."""
    if "LOCAL_RANK" in os.environ:
        yield
        return
    os.environ["LOCAL_RANK"] = str(local_rank)
    try:
        yield
    finally:
        os.environ.pop("LOCAL_RANK", None)


def _disable_shm_comm_op() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory comm op on CPU.

    `build_shm_op` returns None when the op is marked incompatible; the op only serves
    `inference_all_reduce`, which training never calls, and gloo does the actual collectives.
    Compiling it stalled the first process group (docs/benchmarks.md has the cost).
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def join_process_group(
    rank: int, world_size: int, master_addr: str, master_port: int, use_cuda: bool
) -> None:
    """Join (or reuse) this process's torch.distributed group and hand it to DeepSpeed.

    The rendezvous is `tcp://master_addr:master_port` (rank 0's node). A process group that already
    exists (in-process tests build several ranks one after another) is reused when its size matches.
    """
    import deepspeed
    import torch.distributed as dist

    backend = "nccl" if use_cuda else "gloo"
    if not use_cuda:
        _disable_shm_comm_op()
    if dist.is_initialized():
        if dist.get_world_size() != world_size:
            raise RuntimeError(
                f"a process group of size {dist.get_world_size()} already exists; this rank expects {world_size}"
            )
    else:
        dist.init_process_group(
            backend, init_method=f"tcp://{master_addr}:{master_port}", rank=rank, world_size=world_size
        )
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


class Collectives:
    """The few collectives the step needs, on plain Python values; identities for one rank, so the
    objective runs (and is tested) without a process group."""

    def __init__(self, rank: int = 0, world_size: int = 1, device: torch.device | None = None) -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = device or torch.device("cpu")

    def all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        """Element-wise sum (op="sum"), max or min of `values` over the ranks (float64)."""
        if self.world_size == 1:
            return [float(v) for v in values]
        import torch.distributed as dist

        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=ops[op])
        return t.tolist()

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out
