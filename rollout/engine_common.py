"""What the two engines (rollout/engine.py, rollout/hf_engine.py) share: their settings, the thread
budget of the process that runs the model, scoped environment variables, the update-mode and
kv-after-update checks, and per-request progress counts.

`import rollout.engine_common` imports neither vLLM nor torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from slime.core.config import KvAfterUpdate, WeightUpdateMode


@dataclass(frozen=True)
class EngineSettings:
    """How to build an engine; both engines take these fields as keyword arguments.

    dtype: "auto" (bf16 only where the hardware computes it natively, else float32), "float32" or
    "bfloat16". num_threads: OpenMP/torch threads of the process that runs the model; None inherits
    the environment (on a shared CPU machine give each engine its own budget: oversubscribed OpenMP
    threads spin). work_dir: where the vLLM engine keeps its caches and sockets (a temporary dir when
    None). kv_cache_gib, enforce_eager, tensor_parallel_size and weight_alias (serve pushed weights
    from the shm slot: rollout/cpu_alias.py) apply to vLLM only; max_batch_size to the transformers
    engine only.
    """

    model_dir: str
    dtype: str = "auto"
    max_model_len: int = 2048
    kv_cache_gib: float = 1.0
    enforce_eager: bool = True
    seed: int = 0
    tensor_parallel_size: int = 1
    work_dir: str | None = None
    num_threads: int | None = None
    max_batch_size: int = 16
    capture_routes: bool = False
    weight_alias: bool = False

    def __post_init__(self) -> None:
        if self.kv_cache_gib <= 0:
            raise ValueError(f"kv_cache_gib must be > 0, got {self.kv_cache_gib}")


def thread_env(threads: int) -> dict[str, str]:
    """The environment variables that give a process `threads` OpenMP/MKL threads."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def set_thread_budget(threads: int) -> None:
    """Pin torch/OpenMP threads for this whole process (two busy processes on two cores otherwise
    thrash); for processes it spawns later too, through the environment."""
    os.environ.update(thread_env(threads))
    import torch

    torch.set_num_threads(threads)


@contextlib.contextmanager
def scoped_env(updates: Mapping[str, str | None]) -> Iterator[None]:
    """Set (or, for None, remove) environment variables inside the block; restore them after it.

    For settings that processes spawned inside the block must inherit, without leaking them into the
    rest of this process.
    """
    saved = {k: os.environ.get(k) for k in updates}
    _apply_env(updates)
    try:
        yield
    finally:
        _apply_env(saved)


def _apply_env(values: Mapping[str, str | None]) -> None:
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def check_update_mode(mode: str) -> WeightUpdateMode:
    """`mode` as the config's WeightUpdateMode (`rollout.weight_update_mode`); ValueError naming the
    choices otherwise."""
    choices = tuple(m.value for m in WeightUpdateMode)
    if mode not in choices:
        raise ValueError(f"weight update mode must be one of {choices}, got {mode!r}")
    return WeightUpdateMode(mode)


def check_kv_after_update(kv: str) -> KvAfterUpdate:
    """`kv` as the config's KvAfterUpdate (`rollout.kv_after_update`); ValueError naming the choices
    otherwise."""
    choices = tuple(k.value for k in KvAfterUpdate)
    if kv not in choices:
        raise ValueError(f"kv_after_update must be one of {choices}, got {kv!r}")
    return KvAfterUpdate(kv)


class ProgressTracker:
    """Token counts of running requests, with awaitable thresholds (`wait`).

    Lets a caller wait for "request X has produced n tokens" without polling or sleeping (a weight
    update or an abort can then be put in the middle of a generation). Loop-thread only.
    """

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self._waiters: dict[str, list[tuple[int, asyncio.Future]]] = {}

    def begin(self, rid: str) -> None:
        self.counts[rid] = 0

    def update(self, rid: str, count: int) -> None:
        if rid not in self.counts:
            return
        self.counts[rid] = count
        waiters = self._waiters.get(rid)
        if waiters:
            keep = []
            for n, fut in waiters:
                if count >= n:
                    if not fut.done():
                        fut.set_result(count)
                else:
                    keep.append((n, fut))
            self._waiters[rid] = keep

    def end(self, rid: str) -> None:
        count = self.counts.pop(rid, 0)
        for _, fut in self._waiters.pop(rid, []):
            if not fut.done():
                fut.set_result(count)

    async def wait(self, rid: str, n: int) -> int:
        """Wait until request `rid` has at least `n` tokens or has ended; its count then (0 when it is
        not running)."""
        count = self.counts.get(rid)
        if count is None or count >= n:
            return count or 0
        fut = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(rid, []).append((n, fut))
        return await fut
