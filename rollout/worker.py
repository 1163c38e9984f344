"""The rollout worker: one inference engine, many concurrent episodes, groups pushed to the buffer.

Hosted as a Ray actor (async methods share one event loop, so `run` and `update_weights` interleave:
weights land between decoding steps while episodes stay in flight). Each of `max_concurrent_groups`
loops repeats: acquire an admission ticket from the buffer -> pick task `ticket` of the (seeded,
per-epoch shuffled) dataset -> run `group_size` episodes concurrently -> put the Group into the buffer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import time
from typing import Any

from rollout.engines import Engine, make_engine
from slime.core.config import EnvConfig, ModelConfig, RolloutConfig
from slime.core.cores import CoreClaim, available_cores, engine_threads, set_thread_budget
from slime.core.logs import send_output_to
from slime.core.types import Group, SamplingParams, Status, Task, Trajectory, WeightChannel, WeightManifest

TRUNCATED_UNDER_TEACHER = (
    "sampled with top_p/top_k under algorithm.distill.teacher: a truncated student's logprobs cannot be "
    "paired with the teacher's full-distribution ones; send no top_p/top_k from the agent while distilling"
)


def fail_if_truncated(t: Trajectory) -> Trajectory:
    """`t`, or a FAILED copy of it (reason in info["error"], counted in episode/failed) when any of its
    tokens was sampled from a truncated distribution: an agent's own top_p/top_k (the config's are
    refused at start-up, slime/core/validation.py) would pair its nucleus logprob with the teacher's
    full one, a per-token penalty instead of the reverse KL (docs/algorithms.md)."""
    if t.status == Status.FAILED or not t.sample_kept or not any(t.sample_kept):
        return t
    info = {**t.info, "error": TRUNCATED_UNDER_TEACHER, "end_reason": "error"}
    return dataclasses.replace(t, status=Status.FAILED, reward=0.0, info=info)


class TaskSchedule:
    """Ticket -> task: each epoch is a seeded permutation of the dataset, identical on every worker."""

    def __init__(self, tasks: list[Task], seed: int, shuffle: bool) -> None:
        self.tasks = tasks
        self.seed = seed
        self.shuffle = shuffle
        self._perms: dict[int, list[int]] = {}

    def __call__(self, ticket: int) -> Task:
        epoch, i = divmod(ticket, len(self.tasks))
        if epoch not in self._perms:
            order = list(range(len(self.tasks)))
            if self.shuffle:
                random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._perms = {epoch: order}
        return self.tasks[self._perms[epoch][i]]


class GenerationClock:
    """Wall seconds during which the worker had episodes in flight, its engine's weight loads left
    out: the generation time G of `perf/overlap_efficiency` (slime/metrics.py). Concurrent episodes
    count once. While anything is in flight it also holds the worker's `CoreClaim`
    (slime/core/cores.py), so trainer ranks with auto threads leave those cores to the engine.
    Event-loop thread only."""

    def __init__(self, claim: CoreClaim) -> None:
        self.claim = claim
        self._in_flight = 0
        self._paused = 0
        self._busy_s = 0.0
        self._last = time.perf_counter()

    def _tick(self) -> None:
        now = time.perf_counter()
        if self._in_flight and not self._paused:
            self._busy_s += now - self._last
        self._last = now

    def enter(self) -> None:
        self._tick()
        self._in_flight += 1
        if self._in_flight == 1:
            self.claim.claim()

    def exit(self) -> None:
        self._tick()
        self._in_flight -= 1
        if self._in_flight == 0:
            self.claim.release()

    def pause(self) -> None:
        self._tick()
        self._paused += 1

    def resume(self) -> None:
        self._tick()
        self._paused -= 1

    @property
    def in_flight(self) -> int:
        """Groups (or evaluation tasks) in flight now."""
        return self._in_flight

    def take(self) -> float:
        """Busy seconds since the previous call."""
        self._tick()
        busy, self._busy_s = self._busy_s, 0.0
        return busy


class RolloutWorker:
    """Owns one engine; runs episodes for admitted tickets until stopped."""

    def __init__(
        self,
        index: int,
        model_dir: str,
        model_cfg: ModelConfig,
        rollout_cfg: RolloutConfig,
        env_cfg: EnvConfig,
        seed: int,
        work_dir: str,
        capture_routes: bool = False,
        capture_indexer: bool = False,
        log_path: str = "",
        teacher_dir: str = "",
    ) -> None:
        """`log_path`: the file this actor's process writes its output to (slime/core/logs.py: vLLM's
        logs and its engine-core process included); empty leaves the output where it is (a worker
        built inside a test process). `teacher_dir`: an on-policy distillation teacher's checkpoint
        (algorithm.distill.teacher, resolved): the worker runs it on an engine of its own and scores
        every trajectory's tokens with it (`Trajectory.teacher_logprobs`)."""
        if log_path:
            send_output_to(log_path)  # before the engine starts: its process inherits the redirection
        self.index = index
        self.capture_routes = capture_routes  # MoE routes on every output (algorithm.routing_replay=rollout)
        self.capture_indexer = capture_indexer  # DSA key selections on every output (indexer replay)
        self.model_dir = model_dir
        self.model_cfg = model_cfg
        self.cfg = rollout_cfg
        self.env_cfg = env_cfg
        self.seed = seed
        self.work_dir = work_dir
        self.engine: Engine | None = None
        self.teacher_dir = teacher_dir
        self.teacher: Any = None  # the teacher's engine (a VLLMEngine), with algorithm.distill.teacher
        self._teacher_s = 0.0  # seconds spent scoring with it
        self._stopping = False
        self._tokens = 0
        self._episodes_done = 0
        self.clock = GenerationClock(CoreClaim(None, rollout_cfg.threads_per_worker))

    async def start(self) -> dict[str, Any]:
        """Build the engine, tokenizer, chat format, environment class and task schedule."""
        if not self.cfg.threads_per_worker:  # auto, not resolved by a controller: a machine of its own
            threads = engine_threads(self.cfg, 0, available_cores())
            self.cfg = dataclasses.replace(self.cfg, threads_per_worker=threads)
        set_thread_budget(self.cfg.threads_per_worker)
        self.clock = GenerationClock(CoreClaim.for_worker(self.index, self.cfg.threads_per_worker))
        from envs.dataset import load_tasks
        from envs.registry import load_env_class
        from rollout.chat import ChatFormat
        from slime.core.model import load_tokenizer

        t0 = time.perf_counter()
        self.env_cls = load_env_class(self.env_cfg.name)
        self.schedule = TaskSchedule(
            load_tasks(self.env_cfg, self.seed), self.seed, self.env_cfg.dataset.shuffle
        )
        self.tokenizer = load_tokenizer(self.model_dir, self.model_cfg.trust_remote_code)
        self.chat = ChatFormat(self.tokenizer)
        self.engine = make_engine(
            self.model_dir,
            self.model_cfg,
            self.cfg,
            self.seed + self.index,
            self.work_dir,
            capture_routes=self.capture_routes,
            capture_indexer=self.capture_indexer,
        )
        await self.engine.start()
        if self.teacher_dir:
            # Never updated, so no weight transport; prompt logprobs only (rollout/engines/vllm.py `score`).
            self.teacher = make_engine(
                self.teacher_dir, self.model_cfg, self.cfg, self.seed + self.index, self.work_dir + "-teacher"
            )
            await self.teacher.start()
            # The student's behaviour logprobs are of softmax(logits / T) at the rollout temperature;
            # the teacher's must be of the same temperature, or a student equal to its teacher would
            # still see a reverse KL (and be pushed to flatten its logits) when T != 1.
            await self.teacher.set_score_temperature(self.cfg.temperature)
        self.agent_server = None
        from envs.openai_agent import uses_agent

        if uses_agent(self.env_cls):  # env=openai_agent, env=verifiers: agent code drives the episodes
            from rollout.agent.runner import env_agent
            from rollout.agent.server import AgentServer

            # One instance for the worker's life: an env that brings its own agent (env=verifiers) keeps
            # its ecosystem's loaded environment and serving resources on it.
            self.agent_env = self.env_cls(**self.env_cfg.kwargs)
            self.agent_fn = env_agent(self.agent_env, self.env_cfg.agent)
            self.agent_server = await AgentServer.start(
                self.engine, self.chat, self.cfg, model_name=self.model_cfg.name
            )
        return {
            "worker": self.index,
            "start_s": time.perf_counter() - t0,
            "pid": os.getpid(),
            "node_id": _ray_node_id(),  # weights.transport=auto compares it with trainer rank 0's
        }

    def _sampling(self, ticket: int) -> SamplingParams:
        # Seeds derived from (seed, ticket): a ticket generated again (resume, worker restart) samples
        # the same episodes on the same weights, whichever worker runs it.
        seed = self.seed * 1_000_003 + ticket * 7_919 if self.cfg.seeded_sampling else None
        return SamplingParams(
            max_tokens=self.cfg.max_tokens_per_turn,
            temperature=self.cfg.temperature,
            top_p=self.cfg.top_p,
            top_k=self.cfg.top_k,
            stop=list(self.cfg.stop),
            seed=seed,
        )

    async def _generate_group(self, task: Task, ticket: int, start_version: int) -> Group:
        trajs = await self._episodes(task, self.cfg.group_size, self._sampling(ticket))
        if self.teacher is not None:
            trajs = await self._teacher_scores(trajs, ticket)
        self._tokens += sum(t.num_generated for t in trajs)
        self._episodes_done += len(trajs)
        return Group(
            task=task, trajectories=trajs, ticket=ticket, start_version=start_version, worker=self.index
        )

    async def _teacher_scores(self, trajs: list[Trajectory], ticket: int) -> list[Trajectory]:
        """The trajectories with the teacher's logprob of each generated token (0.0 elsewhere); all of
        a group's sequences are scored concurrently (one prefill each on the teacher's engine). Those an
        agent sampled with its own top_p/top_k fail instead (`fail_if_truncated`)."""
        t0 = time.perf_counter()
        trajs = [fail_if_truncated(t) for t in trajs]
        todo = [
            i
            for i, t in enumerate(trajs)
            if t.num_generated and len(t.token_ids) >= 2 and t.status != Status.FAILED
        ]
        scores = await asyncio.gather(
            *(self.teacher.score(trajs[i].token_ids, f"teacher-{ticket}-{i}") for i in todo)
        )
        out = list(trajs)
        for i, lp in zip(todo, scores, strict=True):
            t = trajs[i]
            teacher = [x if m else 0.0 for x, m in zip(lp, t.loss_mask, strict=True)]
            out[i] = dataclasses.replace(t, teacher_logprobs=teacher)
        self._teacher_s += time.perf_counter() - t0
        return out

    async def _episodes(self, task: Task, n: int, sampling: SamplingParams) -> list[Trajectory]:
        from rollout.agent.runner import run_agent_group
        from rollout.episode import run_env_group

        self.clock.enter()
        try:
            if self.agent_server is not None:  # the agent chooses its own sampling per request
                return await run_agent_group(
                    self.engine, self.agent_server, self.chat, task, n, self.agent_fn, self.cfg
                )
            return await run_env_group(
                self.engine,
                lambda: self.env_cls(**self.env_cfg.kwargs),
                task,
                n,
                self.chat,
                self.cfg,
                sampling,
                self.env_cfg,
            )
        finally:
            self.clock.exit()

    async def evaluate(self, tasks: list[Task], n: int, temperature: float, top_p: float) -> list[Group]:
        """`n` episodes of each held-out task on the current weights, beside the training episodes
        (at most max_concurrent_groups tasks at once); nothing reaches the buffer."""
        sampling = SamplingParams(
            max_tokens=self.cfg.max_tokens_per_turn, temperature=temperature, top_p=top_p
        )
        slots = asyncio.Semaphore(self.cfg.max_concurrent_groups)

        async def one(task: Task) -> Group:
            async with slots:
                trajs = await self._episodes(task, n, sampling)
            return Group(task=task, trajectories=trajs, worker=self.index)

        return list(await asyncio.gather(*(one(t) for t in tasks)))

    async def _loop(self, buffer: Any, incarnation: int) -> None:
        while not self._stopping:
            admitted = await buffer.acquire.remote(self.index, incarnation)
            if admitted is None:  # buffer closed (the run is over), or this worker was replaced
                return
            ticket, version = admitted
            group = await self._generate_group(self.schedule(ticket), ticket, version)
            await buffer.put.remote(group)

    async def run(self, buffer: Any, incarnation: int = 0) -> None:
        """Run until stopped; an exception here is a worker failure the controller surfaces.
        `incarnation` counts this worker's restarts (the buffer ignores earlier ones' calls)."""
        loops = (self._loop(buffer, incarnation) for _ in range(self.cfg.max_concurrent_groups))
        await asyncio.gather(*loops)

    async def open_weights(self, channel: WeightChannel) -> None:
        """Open the engine's end of the weight transport (slime/core/transport.py)."""
        await self.engine.open_weights(channel)

    async def update_weights(self, manifest: WeightManifest) -> float:
        self.clock.pause()  # the push's pause is not generation time
        try:
            return await self.engine.update_weights(
                manifest, mode=self.cfg.weight_update_mode, kv_after_update=self.cfg.kv_after_update
            )
        finally:
            self.clock.resume()

    async def stats(self) -> dict[str, float]:
        """Counters since the previous call."""
        out = {
            "tokens": float(self._tokens),
            "episodes": float(self._episodes_done),
            "gen_s": self.clock.take(),
            "groups_in_flight": float(self.clock.in_flight),
        }
        if self.teacher is not None:
            out["teacher_s"] = self._teacher_s
            self._teacher_s = 0.0
        self._tokens, self._episodes_done = 0, 0
        return out

    async def stop(self) -> None:
        self._stopping = True
        self.clock.claim.close()
        if getattr(self, "agent_server", None) is not None:
            await self.agent_server.stop()
        if getattr(self, "agent_env", None) is not None:
            await self.agent_env.close()  # env=verifiers: its serving resources (tool servers) shut down
        if self.engine is not None:
            await self.engine.shutdown()
        if self.teacher is not None:
            await self.teacher.shutdown()


def _ray_node_id() -> str | None:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
