"""The controller: the asynchronous RL loop, top to bottom.

    RolloutWorker x N (Ray actors, one vLLM engine each, max_concurrent_groups loops)
        |  acquire() ticket  (blocks: admission window = (version + max_staleness + 1) * B + refunds)
        |  run group_size episodes of task[ticket]
        v  put(group)
    ReplayBuffer (Ray actor, asyncio)  -- drops stale / failed / zero-variance groups, refunds tickets
        |  get_batch(B, version)  (blocks until B fresh groups: the trainer's only wait)
        v
    Controller (this module, driver process)
        |  train_step(batch, version)  -> TrainerGroup (DeepSpeed ranks, Ray actors)
        |  version += 1
        |  export_weights(version) -> bucketed safetensors manifest
        |  update_weights(manifest) on every worker (engines pause between decoding steps, reload,
        |      resume: in-flight episodes keep going, later tokens carry the new version)
        v  set_version(version) on the buffer -> widens the admission window by B

Back-pressure: rollout can run at most max_staleness + 1 batches ahead of the trainer (admission),
the buffer holds at most buffer.max_groups groups, and the trainer waits only in get_batch.
max_staleness=0 gives the synchronous baseline: generate one batch, train, push, repeat.

Supervision: every await on the trainer or buffer races the workers' `run` futures, so a worker that
dies (engine crash, bug) ends the run with its traceback instead of a silent hang.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import time
from typing import Any

from slime.config import SlimeConfig
from slime.metrics import MetricsLogger, batch_metrics
from slime.types import Group

log = logging.getLogger("slime")


def _ray_env(threads: int) -> dict[str, str]:
    env = {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
    }
    for key in ("SLIME_CACHE_DIR", "VLLM_CPU_OMP_THREADS_BIND", "HF_HUB_OFFLINE", "WANDB_MODE"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


class Controller:
    """Wires workers, buffer and trainer, then runs `trainer.steps` optimizer steps."""

    def __init__(self, cfg: SlimeConfig, model_dir: str, config_dict: dict[str, Any]) -> None:
        self.cfg = cfg
        self.model_dir = model_dir
        self.config_dict = config_dict
        self.version = 0
        self.start_step = 0
        self.workers: list[Any] = []
        self.run_refs: list[Any] = []

    # -- lifecycle -------------------------------------------------------------------------------
    def start_ray(self) -> None:
        import ray

        if ray.is_initialized():
            return
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
        if self.cfg.ray.address:
            kwargs["address"] = self.cfg.ray.address
        elif self.cfg.ray.num_cpus:
            kwargs["num_cpus"] = self.cfg.ray.num_cpus
        ray.init(**kwargs)

    async def setup(self) -> None:
        import ray

        from rollout.worker import RolloutWorker
        from slime.buffer import ReplayBuffer
        from trainer.group import TrainerGroup

        cfg = self.cfg
        self.buffer = (
            ray.remote(num_cpus=0)(ReplayBuffer)
            .options(max_concurrency=1000)
            .remote(
                cfg.buffer,
                cfg.trainer.batch_groups,
                os.path.join(cfg.run_dir, "buffer"),
                cfg.algorithm.dynamic_sampling,
                min_group_size=min(2, cfg.rollout.group_size),
            )
        )
        max_response = min(
            cfg.rollout.max_turns * cfg.rollout.max_tokens_per_turn, cfg.rollout.max_total_tokens
        )
        self.trainer = TrainerGroup(
            self.model_dir,
            cfg.model,
            cfg.trainer,
            cfg.algorithm,
            cfg.seed,
            max_response_len=max_response,
            temperature=cfg.rollout.temperature,
        )
        if not cfg.buffer.replay_path:
            worker_cls = ray.remote(RolloutWorker).options(
                num_cpus=cfg.rollout.num_cpus_per_worker,
                num_gpus=cfg.rollout.gpus_per_worker,
                max_concurrency=1000,
                runtime_env={"env_vars": _ray_env(cfg.rollout.threads_per_worker)},
            )
            self.workers = [
                worker_cls.remote(
                    i,
                    self.model_dir,
                    cfg.model,
                    cfg.rollout,
                    cfg.env,
                    cfg.seed,
                    os.path.join(cfg.run_dir, "rollout", f"worker{i}"),
                )
                for i in range(cfg.rollout.num_workers)
            ]
        t0 = time.perf_counter()
        starts = await asyncio.gather(self.trainer.setup(), *(w.start.remote() for w in self.workers))
        log.info(
            "started trainer and %d rollout workers in %.1fs: %s",
            len(self.workers),
            time.perf_counter() - t0,
            starts[1:],
        )
        if cfg.resume:
            self.start_step, self.version = await self.trainer.load_checkpoint(cfg.resume)
            await self._push_weights()  # engines started from the base model: bring them up to date
            await self.buffer.set_version.remote(self.version)

    async def shutdown(self) -> None:
        import ray

        try:
            await self.buffer.close.remote()
            await asyncio.gather(*(w.stop.remote() for w in self.workers), return_exceptions=True)
            await self.buffer.shutdown.remote()
        finally:
            self.trainer.shutdown()
            for w in self.workers:
                ray.kill(w)
            shutil.rmtree(self._weights_dir(), ignore_errors=True)  # /dev/shm is RAM: leave nothing behind

    # -- supervision -----------------------------------------------------------------------------
    async def _supervised(self, awaitable: Any) -> Any:
        """Await `awaitable`, but fail fast if any rollout worker's run loop ends."""
        task = asyncio.ensure_future(awaitable)
        if not self.run_refs:
            return await task
        watch = [asyncio.ensure_future(self._watch(i, ref)) for i, ref in enumerate(self.run_refs)]
        done, _ = await asyncio.wait([task, *watch], return_when=asyncio.FIRST_COMPLETED)
        for w in watch:
            w.cancel()
        if task in done:
            return task.result()
        task.cancel()
        for w in done:
            w.result()  # raises the worker's error
        raise RuntimeError("a rollout worker stopped unexpectedly")

    @staticmethod
    async def _watch(index: int, ref: Any) -> None:
        try:
            await ref
        except Exception as e:
            raise RuntimeError(f"rollout worker {index} failed: {e}") from e
        raise RuntimeError(f"rollout worker {index} stopped before the run ended")

    # -- the loop --------------------------------------------------------------------------------
    async def _push_weights(self) -> tuple[float, dict[str, float]]:
        t0 = time.perf_counter()
        manifest = await self.trainer.export_weights(
            self.version, self._weights_dir(), self.cfg.trainer.weight_bucket_mb
        )
        export_s = time.perf_counter() - t0
        load = await asyncio.gather(*(w.update_weights.remote(manifest) for w in self.workers))
        return time.perf_counter() - t0, {
            "time/export_s": export_s,
            "time/engine_load_s": max(load, default=0.0),
            "sync/bytes": float(manifest.num_bytes),
        }

    def _weights_dir(self) -> str:
        base = "/dev/shm" if os.path.isdir("/dev/shm") else self.cfg.run_dir
        return os.path.join(base, f"slime-weights-{os.getpid()}")

    async def _next_batch(self, replay: list[Group] | None, step: int) -> tuple[list[Group], float]:
        b = self.cfg.trainer.batch_groups
        if replay is not None:
            start = (step * b) % len(replay)
            return [replay[(start + i) % len(replay)] for i in range(b)], 0.0
        return await self._supervised(self.buffer.get_batch.remote(b, self.version))

    async def run(self) -> list[dict[str, Any]]:
        """Run the configured number of steps; returns the logged metric rows."""
        cfg = self.cfg
        replay = None
        if cfg.buffer.replay_path:
            from slime.buffer import load_recorded_groups

            replay = load_recorded_groups(cfg.buffer.replay_path)
        logger = MetricsLogger(cfg.run_dir, cfg.logger, self.config_dict, cfg.trainer.steps)
        tokenizer = None
        rows: list[dict[str, Any]] = []
        try:
            self.run_refs = [w.run.remote(self.buffer) for w in self.workers]
            t_last = time.perf_counter()
            for step in range(self.start_step, cfg.trainer.steps):
                groups, wait_s = await self._next_batch(replay, step)
                t_train = time.perf_counter()
                metrics = await self._supervised(self.trainer.train_step(groups, self.version))
                train_s = time.perf_counter() - t_train
                trained_version = self.version
                self.version += 1
                sync_s, sync_info = await self._supervised(self._push_weights())
                await self.buffer.set_version.remote(self.version)

                now = time.perf_counter()
                step_s, t_last = now - t_last, now
                rollout = await asyncio.gather(*(w.stats.remote() for w in self.workers))
                row = {
                    "step": step,
                    "version": self.version,
                    **batch_metrics(groups, trained_version),
                    **metrics,
                }
                row.update(await self.buffer.stats.remote() if replay is None else {})
                row.pop("episode/failure_reasons", None)
                row.update(sync_info)
                row.update(
                    {
                        "time/step_s": step_s,
                        "time/train_s": train_s,
                        "time/sync_s": sync_s,
                        "time/wait_s": wait_s,
                        "perf/trainer_idle_frac": max(0.0, 1.0 - train_s / step_s),
                        "perf/rollout_tokens_per_s": sum(r["tokens"] for r in rollout) / step_s,
                        "perf/samples_per_s": metrics.get("train/sequences", 0.0) / step_s,
                    }
                )
                logger.log(row)
                rows.append(row)
                if cfg.logger.sample_every and step % cfg.logger.sample_every == 0:
                    if tokenizer is None:
                        from slime.models import load_tokenizer

                        tokenizer = load_tokenizer(self.model_dir)
                    logger.log_samples(step, groups, tokenizer.decode)
                last = step + 1 == cfg.trainer.steps
                if last or (cfg.trainer.save_every and (step + 1) % cfg.trainer.save_every == 0):
                    ckpt = os.path.join(cfg.run_dir, "checkpoints", f"step_{step + 1:06d}")
                    await self._supervised(self.trainer.save_checkpoint(ckpt, step + 1, self.version))
        finally:
            logger.close()
        return rows


async def run_controller(
    cfg: SlimeConfig, model_dir: str, config_dict: dict[str, Any]
) -> list[dict[str, Any]]:
    """Start Ray, the actors and the loop; always tear the actors down."""
    controller = Controller(cfg, model_dir, config_dict)
    controller.start_ray()
    await controller.setup()
    try:
        return await controller.run()
    finally:
        await controller.shutdown()


def to_dict(cfg: SlimeConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
