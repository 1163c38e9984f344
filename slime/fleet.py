"""The rollout fleet: the worker actors, kept alive.

    start()            every worker builds its engine (in parallel)
    run(buffer)        one episode loop per worker, each watched by a supervisor task
    live() / restart() which workers take pushes now; have one restarted (slime/weight_push.py)
    evaluate(), stats() held-out episodes and counters of the live workers
    failure            a future that raises once a worker died more often than allowed

When a worker or its engine dies (killed, out of memory, a crash inside vLLM) or its loop raises,
its supervisor hands the worker's tickets in flight back to the buffer (they are generated again,
never trained twice), has Ray restart the actor, starts its engine, lets the weight push bring it to
the latest version (`rejoin`: its end of the transport opened again, the remembered manifest loaded)
and resumes its loop; `rollout/restarts` counts these. A worker that fails more than
`rollout.max_restarts` times ends the run with its last error.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from slime.core.config import SlimeConfig
from slime.core.logs import log_file
from slime.core.model import HF_ROUTE_CAPTURE_TYPES, checkpoint_config, count_experts, count_index_topk
from slime.core.types import Group, Task

log = logging.getLogger("slime")


def engine_captures(cfg: SlimeConfig, model_dir: str) -> tuple[bool, bool]:
    """(routes, indexer selections) the fleet's engines capture: every MoE run returns the routes
    (moe/routing_mismatch, routing replay) where the engine can capture them (vLLM; the transformers
    engine for the router kinds it knows), and every sparse-attention run the indexer's key selections
    (dsa/index_mismatch, indexer replay)."""
    hf = checkpoint_config(model_dir)
    routes = (
        cfg.rollout.capture_routes
        and count_experts(hf) > 0
        and (cfg.rollout.engine == "vllm" or hf.get("model_type") in HF_ROUTE_CAPTURE_TYPES)
    )
    return routes, cfg.rollout.capture_indexer and count_index_topk(hf) > 0


def spread_over_nodes(count: int) -> list[Any]:
    """Ray scheduling strategies that deal `count` workers over the cluster's alive nodes in turn
    (soft: a node without room, or a restart after its node died, places the worker elsewhere).
    Ray's own "SPREAD" put both workers of a two-node test on the node the trainer did not use."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0)
    if len(nodes) < 2:
        return ["DEFAULT"] * count
    return [NodeAffinitySchedulingStrategy(node_id=nodes[i % len(nodes)], soft=True) for i in range(count)]


class RolloutFleet:
    """`rollout.num_workers` RolloutWorker actors under supervision."""

    def __init__(self, cfg: SlimeConfig, model_dir: str, ray_env: dict[str, str]) -> None:
        import ray

        from rollout.worker import RolloutWorker

        self.max_restarts = cfg.rollout.max_restarts
        # Each worker's output (its engine's included) goes to its own file; errors name it.
        self.log_paths = [log_file(cfg.run_dir, f"rollout-worker{i}") for i in range(cfg.rollout.num_workers)]
        worker_cls = ray.remote(RolloutWorker)
        options = dict(
            num_cpus=cfg.rollout.num_cpus_per_worker,
            num_gpus=cfg.rollout.gpus_per_worker,
            max_concurrency=1000,
            max_restarts=cfg.rollout.max_restarts,
            runtime_env={"env_vars": ray_env},
        )
        spread = spread_over_nodes(cfg.rollout.num_workers)
        capture_routes, capture_indexer = engine_captures(cfg, model_dir)
        self.workers = [
            worker_cls.options(**options, scheduling_strategy=spread[i]).remote(
                i,
                model_dir,
                cfg.model,
                cfg.rollout,
                cfg.env,
                cfg.seed,
                os.path.join(cfg.run_dir, "rollout", f"worker{i}"),
                capture_routes=capture_routes,
                capture_indexer=capture_indexer,
                log_path=self.log_paths[i],
                teacher_dir=cfg.algorithm.distill.teacher,  # resolved to a checkpoint by slime/train.py
            )
            for i in range(cfg.rollout.num_workers)
        ]
        self.restarts = [0] * len(self.workers)
        self._live = [True] * len(self.workers)  # False while a worker restarts: no pushes, no stats
        self._load_errors: dict[int, str] = {}  # why the weight push had a worker restarted
        # Called with a restarted worker's index before it takes work again: the weight push brings
        # it to the latest version and marks it live (WeightPush.rejoin).
        self.rejoin: Callable[[int], Awaitable[None]] | None = None
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
                                f"(rollout.max_restarts={self.max_restarts}; its log: "
                                f"{self.log_paths[index]}); last error: {reason}"
                            )
                        )
                    return
                log.warning(
                    "rollout worker %d failed (%s); restarting it (its log: %s)",
                    index,
                    reason.splitlines()[0],
                    self.log_paths[index],
                )
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
        if self.rejoin is not None:
            await self.rejoin(index)  # marks it live under the push's lock
        else:
            self.mark_live(index)
        log.warning(
            "rollout worker %d back in %.1fs; %d tickets in flight generated again",
            index,
            time.perf_counter() - t0,
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

    def live(self) -> list[int]:
        """Indices of the workers that are up and serving (not restarting)."""
        return [i for i, ok in enumerate(self._live) if ok]

    def mark_live(self, index: int) -> None:
        self._live[index] = True

    def restart(self, index: int, reason: str, died: bool) -> None:
        """Take worker `index` out of service; its supervisor brings it back. A worker that `died` is
        being restarted by Ray already; one that is up is killed so Ray restarts it, with `reason`
        logged as its failure."""
        import ray

        self._live[index] = False
        if not died:
            self._load_errors[index] = reason
            ray.kill(self.workers[index], no_restart=False)

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

    async def stats(self, step_s: float) -> tuple[int, float, dict[str, float]]:
        """Since the previous call: tokens the live workers generated, the generation seconds of the
        busiest one (wall time with episodes in flight, weight loads left out), and per worker i
        (`rollout/worker<i>/...`): its tokens/s over `step_s`, its groups in flight now (its load) and
        its restarts so far (a worker restarting reports only those)."""
        from ray.exceptions import RayActorError

        live = self.live()
        rows = await asyncio.gather(*(self.workers[i].stats.remote() for i in live), return_exceptions=True)
        per_worker: dict[str, float] = {}
        tokens, busiest = 0, 0.0
        for i, row in zip(live, rows, strict=True):
            # A worker that died since it was last seen live has no stats; its supervisor restarts it.
            if isinstance(row, RayActorError):
                continue
            if isinstance(row, BaseException):
                raise row
            tokens += int(row["tokens"])
            busiest = max(busiest, row["gen_s"])
            per_worker[f"rollout/worker{i}/tokens_per_s"] = row["tokens"] / step_s if step_s > 0 else 0.0
            per_worker[f"rollout/worker{i}/groups_in_flight"] = row["groups_in_flight"]
            if "teacher_s" in row:  # algorithm.distill: seconds the worker's teacher spent scoring
                per_worker[f"rollout/worker{i}/teacher_s"] = row["teacher_s"]
        for i, n in enumerate(self.restarts):
            per_worker[f"rollout/worker{i}/restarts"] = float(n)
        return tokens, busiest, per_worker

    async def stop(self) -> None:
        import ray

        self._closing = True
        await asyncio.gather(*(w.stop.remote() for w in self.workers), return_exceptions=True)
        for task in self._supervisors:
            task.cancel()
        for w in self.workers:
            ray.kill(w, no_restart=True)
