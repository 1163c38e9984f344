"""The rollout fleet: the worker actors, kept alive, fed the current weights.

    start()            every worker builds its engine (in parallel)
    run(buffer)        one episode loop per worker, each watched by a supervisor task
    connect_weights()  open every worker's end of the weight transport (slime/core/transport.py)
    update_weights(m)  push manifest m to every live worker; remembered for restarts
    failure            a future that raises once a worker died more often than allowed

When a worker or its engine dies (killed, out of memory, a crash inside vLLM) or its loop raises,
its supervisor hands the worker's tickets in flight back to the buffer (they are generated again,
never trained twice), has Ray restart the actor, starts its engine, opens its end of the weight
transport again (broadcast: a new group of its own), loads the latest weights and resumes its loop;
`rollout/restarts` counts these. A worker that dies during a push is skipped by that push, and one
that is up but failed to load it (its engine died, its broadcast broke) is restarted the same way, so
the others' versions never wait on it. A worker that fails more than `rollout.max_restarts` times ends the
run with its last error.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import Any, Protocol

from slime.core.config import SlimeConfig, Transport
from slime.core.model import count_experts
from slime.core.transport import for_engine
from slime.core.types import Group, Task, WeightChannel, WeightManifest

log = logging.getLogger("slime")


def is_moe(model_dir: str) -> bool:
    """Whether the resolved checkpoint in `model_dir` is a mixture-of-experts model."""
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        return count_experts(json.load(f)) > 0


class WeightSource(Protocol):
    """Trainer rank 0's end of a broadcast, as the fleet drives it (trainer.ranks.TrainerRanks)."""

    async def accept_weights(self, key: str, ranks: int) -> None: ...

    async def send_weights(self, manifest: WeightManifest, keys: list[str]) -> dict[str, str]: ...


class RolloutFleet:
    """`rollout.num_workers` RolloutWorker actors under supervision."""

    def __init__(self, cfg: SlimeConfig, model_dir: str, ray_env: dict[str, str]) -> None:
        import ray

        from rollout.worker import RolloutWorker

        self.max_restarts = cfg.rollout.max_restarts
        worker_cls = ray.remote(RolloutWorker).options(
            num_cpus=cfg.rollout.num_cpus_per_worker,
            num_gpus=cfg.rollout.gpus_per_worker,
            max_concurrency=1000,
            max_restarts=cfg.rollout.max_restarts,
            runtime_env={"env_vars": ray_env},
        )
        self.workers = [
            worker_cls.remote(
                i,
                model_dir,
                cfg.model,
                cfg.rollout,
                cfg.env,
                cfg.seed,
                os.path.join(cfg.run_dir, "rollout", f"worker{i}"),
                # Every MoE run returns the engine's routes (moe/routing_mismatch, replay) where vLLM runs.
                capture_routes=cfg.rollout.capture_routes
                and cfg.rollout.engine == "vllm"
                and is_moe(model_dir),
            )
            for i in range(cfg.rollout.num_workers)
        ]
        self.restarts = [0] * len(self.workers)
        self._live = [True] * len(self.workers)  # False while a worker restarts: no pushes, no stats
        # The remembered manifest stays loadable: the trainer keeps the two newest versions, and a push
        # replaces this one before the trainer publishes the next (slime/core/transport.py).
        self._manifest: WeightManifest | None = None
        self._channel: WeightChannel | None = None
        self._source: WeightSource | None = None
        self._engine_ranks = cfg.rollout.tensor_parallel_size if cfg.rollout.engine == "vllm" else 1
        self._keys = [""] * len(self.workers)  # broadcast: each worker's current group
        self._push_lock = asyncio.Lock()  # a restart's weight load never interleaves with a push
        self._load_errors: dict[int, str] = {}  # why update_weights had a worker restarted
        self._supervisors: list[asyncio.Task] = []
        self._closing = False
        self.failure: asyncio.Future = asyncio.get_running_loop().create_future()

    async def start(self) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(w.start.remote() for w in self.workers)))

    def run(self, buffer: Any) -> None:
        """Start every worker's episode loop under a supervisor."""
        self._supervisors = [
            asyncio.create_task(self._supervise(i, buffer), name=f"supervise-worker{i}")
            for i in range(len(self.workers))
        ]

    async def _supervise(self, index: int, buffer: Any) -> None:
        from ray.exceptions import RayActorError

        worker = self.workers[index]
        restart, died = False, False
        while True:
            try:
                if restart:
                    await self._restart(index, buffer, died)  # a restart that fails is one more failure
                await worker.run.remote(buffer, self.restarts[index])
                return  # the buffer closed: the run is over
            except Exception as e:  # the actor died, its loop raised, or its restart failed
                if self._closing:
                    return
                reason = self._load_errors.pop(index, None) or str(e)
                self.restarts[index] += 1
                if self.restarts[index] > self.max_restarts:
                    if not self.failure.done():
                        self.failure.set_exception(
                            RuntimeError(
                                f"rollout worker {index} failed {self.restarts[index]} times "
                                f"(rollout.max_restarts={self.max_restarts}); last error: {reason}"
                            )
                        )
                    return
                log.warning("rollout worker %d failed (%s); restarting it", index, reason.splitlines()[0])
                restart, died = True, isinstance(e, RayActorError)

    async def _restart(self, index: int, buffer: Any, died: bool) -> None:
        import ray

        t0 = time.perf_counter()
        self._live[index] = False
        lost = await buffer.requeue.remote(index, self.restarts[index])
        worker = self.workers[index]
        if not died:
            ray.kill(worker, no_restart=False)  # its loop raised but the actor is up: restart it too
        await self._call_when_back(worker.start)
        async with self._push_lock:
            await self._connect(index)
            if self._manifest is not None:
                _, failed = await self._deliver(self._manifest, [index])
                if failed:
                    raise failed[index]
            self._live[index] = True
        log.warning(
            "rollout worker %d back in %.1fs at version %s; %d tickets in flight generated again",
            index,
            time.perf_counter() - t0,
            self._manifest.version if self._manifest else 0,
            len(lost),
        )

    @staticmethod
    async def _call_when_back(method: Any, attempts: int = 20) -> Any:
        """Ray queues calls to an actor it is restarting, but one sent in the moment of a kill can
        fail with ActorUnavailableError (each such failure takes Ray a second or two to report)."""
        from ray.exceptions import ActorUnavailableError

        for attempt in range(attempts):
            try:
                return await method.remote()
            except ActorUnavailableError:
                if attempt + 1 == attempts:
                    raise

    async def connect_weights(self, channel: WeightChannel, source: WeightSource) -> None:
        """Open every worker's end of the weight transport whose trainer end returned `channel`;
        restarted workers open theirs again."""
        self._channel, self._source = channel, source
        await asyncio.gather(*(self._connect(i) for i in range(len(self.workers))))

    async def _connect(self, index: int) -> None:
        channel, worker = self._channel, self.workers[index]
        if channel is None:
            return
        if channel.transport != Transport.broadcast:
            await worker.open_weights.remote(channel)
            return
        assert self._source is not None
        key = f"worker{index}-start{self.restarts[index]}"  # a restarted engine joins a new group
        await asyncio.gather(
            self._source.accept_weights(key, self._engine_ranks),
            worker.open_weights.remote(for_engine(channel, key, self._engine_ranks)),
        )
        self._keys[index] = key

    async def _deliver(
        self, manifest: WeightManifest, indices: list[int]
    ) -> tuple[list[float], dict[int, BaseException]]:
        """Load `manifest` on workers `indices` (broadcast: trainer rank 0 sends while they receive).
        Returns the load seconds of those that loaded it and the error of each that did not (died
        meanwhile, or its load or its share of the broadcast failed); one failure never stops the
        others' loads."""
        loads = asyncio.gather(
            *(self.workers[i].update_weights.remote(manifest) for i in indices), return_exceptions=True
        )
        unreached: dict[str, str] = {}
        if manifest.transport == Transport.broadcast:
            assert self._source is not None, "broadcast manifest before connect_weights"
            unreached, results = await asyncio.gather(
                self._source.send_weights(manifest, [self._keys[i] for i in indices]), loads
            )
        else:
            results = await loads
        seconds: list[float] = []
        failed: dict[int, BaseException] = {}
        for i, result in zip(indices, results, strict=True):
            if isinstance(result, BaseException):
                failed[i] = result
            elif self._keys[i] in unreached:
                failed[i] = RuntimeError(f"weight broadcast failed: {unreached[self._keys[i]]}")
            else:
                seconds.append(result)
        return seconds, failed

    async def update_weights(self, manifest: WeightManifest) -> float:
        """Load `manifest` on every live worker; returns the slowest engine's load time. A worker
        that fails to load it is restarted (and then loads the manifest remembered here)."""
        import ray
        from ray.exceptions import RayActorError

        async with self._push_lock:
            self._manifest = manifest
            live = [i for i, ok in enumerate(self._live) if ok]
            seconds, failed = await self._deliver(manifest, live)
            for i, error in failed.items():
                log.warning("rollout worker %d did not load version %d: %s", i, manifest.version, error)
                self._live[i] = False
                if not isinstance(error, RayActorError):  # up, but its engine is not at this version
                    self._load_errors[i] = f"loading weight version {manifest.version}: {error}"
                    ray.kill(self.workers[i], no_restart=False)  # its supervisor restarts it
            return max(seconds, default=0.0)

    async def evaluate(self, tasks: list[Task], n: int, temperature: float, top_p: float) -> list[Group]:
        """Held-out episodes on the live workers, tasks dealt round-robin; returns their groups."""
        live = [w for w, ok in zip(self.workers, self._live, strict=True) if ok]
        shards = [tasks[i :: len(live)] for i in range(len(live))]
        results = await asyncio.gather(
            *(
                w.evaluate.remote(shard, n, temperature, top_p)
                for w, shard in zip(live, shards, strict=True)
                if shard
            )
        )
        return [g for shard in results for g in shard]

    async def stats(self) -> tuple[int, float]:
        """Since the previous call: tokens the live workers generated, and the generation seconds of
        the busiest one (wall time with episodes in flight, weight loads left out)."""
        from ray.exceptions import RayActorError

        live = [w for w, ok in zip(self.workers, self._live, strict=True) if ok]
        rows = await asyncio.gather(*(w.stats.remote() for w in live), return_exceptions=True)
        # A worker that died since it was last seen live has no stats; its supervisor restarts it.
        rows = [r for r in rows if not isinstance(r, RayActorError)]
        if errors := [r for r in rows if isinstance(r, BaseException)]:
            raise errors[0]
        return int(sum(r["tokens"] for r in rows)), max((r["gen_s"] for r in rows), default=0.0)

    async def stop(self) -> None:
        import ray

        self._closing = True
        await asyncio.gather(*(w.stop.remote() for w in self.workers), return_exceptions=True)
        for task in self._supervisors:
            task.cancel()
        for w in self.workers:
            ray.kill(w, no_restart=True)
