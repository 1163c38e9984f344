"""The controller: the asynchronous RL loop, top to bottom (docs/architecture.md follows one batch).

    RolloutWorker x N (rollout/worker.py; Ray actors supervised by slime/fleet.py; one vLLM engine
        |              each, rollout/engines/vllm.py; max_concurrent_groups episode loops, rollout/episode.py)
        |  acquire() ticket  (blocks: admission window = (version + max_staleness + 1) * B + refunds)
        |  run group_size episodes of task[ticket]  (envs/: the environment contract and built-ins)
        v  put(group)
    ReplayBuffer (slime/buffer.py, Ray actor)  -- drops stale / failed / zero-variance groups, refunds
        |  get_batch(B, version)  (blocks until B fresh groups: the trainer's only wait)
        v
    Controller (this module, driver process)
        |  train_step(batch, version)  -> TrainerRanks (trainer/actors.py -> trainer/rank.py per rank)
        |  version += 1
        |  push.publish(version) (slime/weight_push.py): rank 0 writes the weights through its transport
        |      (weights.transport shm, broadcast or files), every live worker's engine loads them
        |      between decoding steps and resumes: in-flight episodes keep going, later tokens carry
        |      the new version
        |  set_version(version) on the buffer -> widens the admission window by B
        v  step_row -> metrics.jsonl + wandb (slime/metrics.py); checkpoint every save_every steps

Back-pressure: rollout can run at most max_staleness + 1 batches ahead of the trainer (admission),
the buffer holds at most buffer.max_groups groups, and the trainer waits only in get_batch.
max_staleness=0 gives the synchronous baseline: generate one batch, train, push, repeat.

Supervision: every await on the trainer or buffer races the fleet's failure future. A worker or
engine that dies is restarted by the fleet (its tickets in flight are issued again), up to
rollout.max_restarts; past that the run ends with the worker's last error.

Stopping: SIGINT/SIGTERM end the loop at the next safe point (trainer.on_stop: finish the step in
progress, or abandon it), publish a checkpoint and exit within trainer.stop_timeout_s; a second
signal exits at once. Checkpoints are written under a temporary name and renamed into place, so the
last published one is always complete; `resume=auto` continues from it exactly (trainer state,
buffer tickets and untrained groups, wandb run, metrics.jsonl without repeated steps).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from slime.core import checkpoint as ck
from slime.core.config import SlimeConfig
from slime.core.cores import available_cores, engine_threads, remove_claims
from slime.core.logs import LOGS_DIR
from slime.fleet import RolloutFleet
from slime.weight_push import WeightPush

if TYPE_CHECKING:
    from slime.core.config import RayConfig
    from slime.evaluator import Evaluator
from slime.core.types import Batch, Group
from slime.metrics import MetricsLogger, StepTimes, step_row, truncate_from_step

log = logging.getLogger("slime")

TRAINED_LOG = "trained.jsonl"  # under <run_dir>/buffer/: the tickets and tasks of every step's batch


class Stopped(Exception):
    """The run stopped on a signal; `checkpoint` is the last complete checkpoint (None if there is none)."""

    def __init__(self, signal_name: str, steps_done: int, checkpoint: str | None) -> None:
        self.signal_name = signal_name
        self.steps_done = steps_done
        self.checkpoint = checkpoint
        where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint was written"
        super().__init__(f"stopped by {signal_name} after {steps_done} steps; {where}")


class _StopNow(Exception):
    """Raised inside the loop when a stop request interrupts a wait."""


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


def _with_engine_threads(cfg: SlimeConfig) -> SlimeConfig:
    """`cfg` with rollout.threads_per_worker resolved (0 = auto follows the mode:
    slime/core/config/rollout.py)."""
    threads = engine_threads(cfg.rollout, cfg.buffer.max_staleness, available_cores(cfg.ray.num_cpus))
    if threads != cfg.rollout.threads_per_worker:
        log.info("rollout.threads_per_worker=auto: %d thread(s) per engine", threads)
    return dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, threads_per_worker=threads))


def ray_init_options(cfg: RayConfig, log_to_driver: bool = True) -> dict[str, Any]:
    """`ray.init` keyword arguments for the `ray` section: join `address` ("auto": the running
    cluster), or start a private local cluster with `num_cpus` whose worker processes run at
    `worker_niceness` (Ray's own default, 15, makes slime's engines and trainer ranks, which are the
    whole job, yield to every other process).

    `log_to_driver` (Ray forwarding what actors print to this console) stays on for runs: each actor
    sends its output to its own file in the run dir (slime/core/logs.py), so what Ray forwards is
    only the warnings of slime's own code in the actors, and Ray's notes on workers that died."""
    options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": log_to_driver}
    if cfg.address:
        options["address"] = cfg.address  # the cluster's own settings hold there
        return options
    # A private cluster: without an address Ray would join whatever RAY_ADDRESS or the last
    # `ray start` (/tmp/ray/ray_current_cluster) names, a dead cluster's leftovers included.
    options["address"] = "local"
    if cfg.num_cpus:
        options["num_cpus"] = cfg.num_cpus
    options["_system_config"] = {"worker_niceness": cfg.worker_niceness}
    return options


class Controller:
    """Wires workers, buffer and trainer, then runs `trainer.steps` optimizer steps."""

    def __init__(self, cfg: SlimeConfig, model_dir: str, config_dict: dict[str, Any]) -> None:
        self.cfg = cfg
        self.model_dir = model_dir
        self.config_dict = config_dict
        self.version = 0
        self.start_step = 0
        self.fleet: RolloutFleet | None = None  # None when replaying recorded groups
        self.push: WeightPush | None = None  # likewise
        self._tokenizer: Any = None  # loaded on the first sample log
        self._t_last = 0.0  # when the previous step ended (perf_counter)
        self.steps_done = 0  # optimizer steps completed, counting those before a resume
        self.last_checkpoint: str | None = None
        self.stop_signal: str | None = None
        self._resume_state: dict[str, Any] = {}  # the checkpoint's controller state on resume
        self._logger: MetricsLogger | None = None
        self._stop = asyncio.Event()
        self._batch_abandoned = False  # a stop interrupted get_batch: its batch was never trained

    def request_stop(self, signal_name: str) -> None:
        """Stop admitting work, end the loop at the next safe point and checkpoint (see `run`)."""
        self.stop_signal = signal_name
        self._stop.set()

    # -- lifecycle -------------------------------------------------------------------------------
    def start_ray(self) -> None:
        import ray

        if not ray.is_initialized():
            ray.init(**ray_init_options(self.cfg.ray))

    async def setup(self) -> None:
        import ray

        from slime.buffer import ReplayBuffer
        from slime.fleet import RolloutFleet
        from slime.placement import cluster_nodes, plan, requests, watch
        from trainer.actors import TrainerRanks
        from trainer.rank import TrainerSpec

        # Every actor's request against the cluster before any starts (shared cores on a small one).
        cfg = self.cfg = plan(self.cfg, cluster_nodes())
        self.buffer = (
            ray.remote(num_cpus=0)(ReplayBuffer)
            # The buffer is the driver's state: on the driver's node, so that losing another node
            # never loses it (a rollout worker there is restarted elsewhere).
            .options(max_concurrency=1000, scheduling_strategy=_on_this_node())
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
        self.trainer = TrainerRanks(
            TrainerSpec(
                self.model_dir,
                cfg.model,
                cfg.trainer,
                cfg.algorithm,
                cfg.seed,
                max_response_len=max_response,
                temperature=cfg.rollout.temperature,
            ),
            run_dir=cfg.run_dir,
        )
        if not cfg.buffer.replay_path:
            cfg = self.cfg = _with_engine_threads(cfg)
            self.fleet = RolloutFleet(cfg, self.model_dir, _ray_env(cfg.rollout.threads_per_worker))
        t0 = time.perf_counter()
        starting = asyncio.gather(self.trainer.setup(), self.fleet.start() if self.fleet else _nothing())
        _, starts = await watch(starting, requests(cfg), 10.0, cfg.ray.placement_timeout_s)
        workers = f" and {len(starts)} rollout worker(s)" if starts else ""
        log.info("started the trainer%s in %.1fs", workers, time.perf_counter() - t0)
        if self.fleet is not None:
            self.push = WeightPush(cfg, self.trainer, self.fleet)
            self.fleet.rejoin = self.push.rejoin
            await self._supervised(self.push.open([s["node_id"] for s in starts]))
        if cfg.resume:
            self.start_step, self.version = await self.trainer.load_checkpoint(cfg.resume)
            self.steps_done = self.start_step
            self._resume_state = ck.read_controller_state(cfg.resume)
            if self._resume_state:
                await self.buffer.restore.remote(self._resume_state["buffer"])
            else:
                log.warning("resume=%s has no %s: tickets start again at 0", cfg.resume, ck.CONTROLLER_STATE)
            if self.push is not None:  # engines started from the base model: bring them up to date
                await self._supervised(self.push.publish(self.version))
            await self.buffer.set_version.remote(self.version)

    async def shutdown(self) -> None:
        import ray

        try:
            await self.buffer.close.remote()
            if self.fleet is not None:
                await self.fleet.stop()
            await self.buffer.shutdown.remote()
        finally:
            self.trainer.shutdown()
            ray.kill(self.buffer)
            if self.push is not None:
                self.push.close()
            remove_claims()  # of workers that died without withdrawing them

    # -- supervision -----------------------------------------------------------------------------
    async def _supervised(self, awaitable: Any, interruptible: bool = False) -> Any:
        """Await `awaitable`, but fail fast once the fleet gives up on a worker (its error is raised).

        With `interruptible`, a stop request (signal) abandons the wait and raises `_StopNow`.
        """
        task = asyncio.ensure_future(awaitable)
        watch: list[asyncio.Future] = []
        if self.fleet is not None:
            watch.append(self.fleet.failure)
        if interruptible:
            watch.append(asyncio.ensure_future(self._stop.wait()))
        if not watch:
            return await task
        done, _ = await asyncio.wait([task, *watch], return_when=asyncio.FIRST_COMPLETED)
        if interruptible:
            watch[-1].cancel()
        if task in done:
            return task.result()
        task.cancel()
        if self.fleet is not None and self.fleet.failure.done():
            self.fleet.failure.result()  # raises the worker's error
        raise _StopNow

    # -- the loop --------------------------------------------------------------------------------
    async def _next_batch(self, replay: list[Group] | None, step: int) -> tuple[Batch, float]:
        """The next batch, by reference (slime/buffer.py `hand_out`): only its tickets, task ids,
        token counts and metrics reach this process."""
        b = self.cfg.trainer.batch_groups
        if replay is not None:
            start = (step * b) % len(replay)
            groups = [replay[(start + i) % len(replay)] for i in range(b)]
            return replay_batch(groups, self.version), 0.0
        try:
            return await self._supervised(self.buffer.hand_out.remote(b, self.version), interruptible=True)
        except _StopNow:
            self._batch_abandoned = True  # the buffer keeps what that call took (snapshot)
            raise

    async def _train(self, batch: Batch) -> tuple[dict[str, float], float]:
        """One optimizer step on `batch`; the policy version moves on by one."""
        t0 = time.perf_counter()
        abandon = self.cfg.trainer.on_stop == "abandon"  # a signal may cut the step short
        metrics = await self._supervised(self.trainer.train_step(batch, self.version), interruptible=abandon)
        self.version += 1
        return metrics, time.perf_counter() - t0

    async def _publish(self) -> tuple[float, dict[str, float]]:
        """Push the new weights to every engine, then let the buffer admit the next version's work."""
        if self.push is None:  # replaying recorded groups: no engine to push to
            return 0.0, {}
        sync_s, sync_info = await self._supervised(self.push.publish(self.version))
        await self.buffer.set_version.remote(self.version)
        return sync_s, sync_info

    async def _rollout_stats(self, step_s: float) -> tuple[int, float, dict[str, float]]:
        """Tokens generated and the busiest worker's generation seconds since the previous step, and
        each worker's figures (slime/fleet.py `stats`)."""
        return await self.fleet.stats(step_s) if self.fleet else (0, 0.0, {})

    async def _buffer_stats(self, replaying: bool) -> dict[str, Any]:
        return {} if replaying else await self.buffer.stats.remote()

    def _log_trained(self, step: int, batch: Batch) -> None:
        """buffer/trained.jsonl: which tickets and tasks each step trained on, in batch order."""
        row = {"step": step, "version": self.version - 1, "tickets": batch.tickets, "tasks": batch.task_ids}
        self._trained_log.write(json.dumps(row) + "\n")
        self._trained_log.flush()

    def _log_samples(self, logger: MetricsLogger, step: int, batch: Batch) -> None:
        every = self.cfg.logger.sample_every
        if not every or step % every:
            return
        if self._tokenizer is None:
            from slime.core.model import load_tokenizer

            self._tokenizer = load_tokenizer(self.model_dir, self.cfg.model.trust_remote_code)
        # The only trajectories this process ever fetches: the few the samples table shows.
        groups = fetch(batch.groups[: self.cfg.logger.num_samples])
        logger.log_samples(step, groups, self._tokenizer.decode)

    async def _maybe_checkpoint(self, step: int) -> None:
        done = step + 1
        every = self.cfg.trainer.save_every
        last = done == self.cfg.trainer.steps and self.cfg.trainer.save_final
        if last or (every and done % every == 0):
            await self._checkpoint(done)

    async def _checkpoint(self, steps_done: int) -> str:
        """Write a checkpoint under a temporary name, then publish it with one atomic rename.

        A kill at any moment leaves either no `step_N` or a complete one, so the previous checkpoint
        stays the latest loadable; `trainer.keep_checkpoints` bounds how many are kept.
        """
        final = ck.checkpoint_dir(self.cfg.run_dir, steps_done)
        if self.last_checkpoint == final:
            return final  # this step's checkpoint is already written
        partial = ck.partial_dir(final)
        await self._supervised(self.trainer.save_checkpoint(partial, steps_done, self.version))
        state = {
            "buffer": await self.buffer.snapshot.remote(self._batch_abandoned),
            "wandb_run_id": self._logger.wandb_run_id if self._logger else None,
        }
        ck.write_controller_state(partial, state)
        self.last_checkpoint = ck.publish(partial, final, self.cfg.trainer.keep_checkpoints)
        return final

    async def run(self) -> list[dict[str, Any]]:
        """Run the configured number of steps; returns the logged metric rows.

        Raises `Stopped` after a signal: the loop ends at the next wait (or, with
        `trainer.on_stop=finish`, after the step in progress), a checkpoint is published, and
        the caller tears the actors down.
        """
        cfg = self.cfg
        replay = None
        if cfg.buffer.replay_path:
            from slime.buffer import load_recorded_groups

            replay = load_recorded_groups(cfg.buffer.replay_path)
        logger = MetricsLogger(
            cfg.run_dir,
            cfg.logger,
            self.config_dict,
            cfg.trainer.steps,
            resume_step=self.start_step if cfg.resume else None,
            wandb_run_id=self._resume_state.get("wandb_run_id"),
        )
        self._logger = logger
        trained_path = os.path.join(cfg.run_dir, "buffer", TRAINED_LOG)
        os.makedirs(os.path.dirname(trained_path), exist_ok=True)
        if cfg.resume:
            truncate_from_step(trained_path, self.start_step)
        self._trained_log = open(trained_path, "a", encoding="utf-8")
        rows: list[dict[str, Any]] = []
        try:
            if self.fleet is not None:
                self.fleet.run(self.buffer)
            evaluator = self._evaluator(logger)
            self._t_last = time.perf_counter()
            for step in range(self.start_step, cfg.trainer.steps):
                if evaluator is not None:
                    evaluator.maybe_start(self.steps_done, self.version)
                if self._stop.is_set():
                    break
                try:
                    rows.append(await self._step(step, replay, logger))
                except _StopNow:
                    break
            if evaluator is not None and self.stop_signal is None:
                await self._supervised(evaluator.finish())  # one still running from an earlier step
                evaluator.maybe_start(self.steps_done, self.version)  # after the last step
                await self._supervised(evaluator.finish())
            if self.stop_signal is not None:
                await self._close_admission()
                if cfg.trainer.on_stop == "finish" and self.steps_done > self.start_step:
                    await self._checkpoint(self.steps_done)
                raise Stopped(self.stop_signal, self.steps_done, self.last_checkpoint)
        finally:
            logger.close()
            self._trained_log.close()
        return rows

    def _evaluator(self, logger: MetricsLogger) -> Evaluator | None:
        if not self.cfg.eval.every or self.fleet is None:
            return None
        from slime.evaluator import Evaluator

        return Evaluator(self.cfg, self.fleet, logger)

    async def _step(self, step: int, replay: list[Group] | None, logger: MetricsLogger) -> dict[str, Any]:
        """One trainer step: take a batch, train, push the weights, log, maybe checkpoint."""
        batch, wait_s = await self._next_batch(replay, step)
        trainer_metrics, train_s = await self._train(batch)
        sync_s, sync_info = await self._publish()
        now = time.perf_counter()
        tokens, gen_s, per_worker = await self._rollout_stats(now - self._t_last)
        times = StepTimes(
            step_s=now - self._t_last,
            train_s=train_s,
            sync_s=sync_s,
            wait_s=wait_s,
            gen_s=gen_s,
            load_s=sync_info.get("time/engine_load_s", 0.0),
        )
        self._t_last = now
        row = step_row(
            step,
            self.version,
            batch.metrics,
            trainer_metrics,
            await self._buffer_stats(replay is not None),
            sync_info,
            times,
            tokens,
            restarts=sum(self.fleet.restarts) if self.fleet else 0,
        )
        row.update(per_worker)
        logger.log(row)
        self._log_trained(step, batch)
        self._log_samples(logger, step, batch)
        await self._maybe_checkpoint(step)
        self.steps_done = step + 1
        return row

    async def _close_admission(self) -> None:
        await self.buffer.close.remote()


async def run_controller(
    cfg: SlimeConfig, model_dir: str, config_dict: dict[str, Any]
) -> list[dict[str, Any]]:
    """Start Ray, the actors and the loop; always tear the actors down."""
    controller = Controller(cfg, model_dir, config_dict)
    controller.start_ray()  # before our handlers: ray.init installs a SIGTERM handler that aborts
    with _stop_on_signals(controller, cfg.trainer.stop_timeout_s):
        await controller.setup()
        try:
            return await controller.run()
        except Stopped:
            raise
        except Exception:
            # A dead trainer rank, a worker past its restarts, a bug: say where a resume starts.
            where = controller.last_checkpoint or cfg.resume
            log.error(
                "the run failed after %d steps; %s; the actors' logs are in %s",
                controller.steps_done,
                f"resume=auto (or resume={where}) continues from there" if where else "no checkpoint yet",
                os.path.join(cfg.run_dir, LOGS_DIR),
            )
            raise
        finally:
            await controller.shutdown()


@contextlib.contextmanager
def _stop_on_signals(controller: Controller, timeout_s: float) -> Iterator[None]:
    """SIGINT/SIGTERM (Ctrl-C, a scheduler's preemption notice) ask the controller to stop cleanly.

    The first signal requests a checkpointed stop and arms a `timeout_s` deadline; a second signal,
    or the deadline, exits the process at once. Either way the last published checkpoint is intact:
    checkpoints are only ever renamed into place when complete.
    """
    loop = asyncio.get_running_loop()

    def hard_exit(code: int, why: str) -> None:
        where = controller.last_checkpoint or "none written by this run"
        print(f"slime: {why}; exiting now. Last complete checkpoint: {where}", file=sys.stderr, flush=True)
        os._exit(code)

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if controller.stop_signal is not None:
            hard_exit(128 + signum, f"second {name}")
        print(
            f"slime: {name}: stopping after the current step and writing a checkpoint "
            f"(at most {timeout_s:.0f}s; send it again to exit at once)",
            file=sys.stderr,
            flush=True,
        )
        controller.request_stop(name)
        loop.call_later(timeout_s, hard_exit, 128 + signum, f"the stop took longer than {timeout_s:.0f}s")

    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, on_signal, sig)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread: leave as is
            pass
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def _on_this_node() -> Any:
    """A Ray scheduling strategy that pins an actor to this process's node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)


async def _nothing() -> None:
    return None


def replay_batch(groups: list[Group], version: int) -> Batch:
    """Recorded groups (buffer.replay_path, read in this process) as a batch trained at `version`."""
    from slime.metrics import batch_metrics

    return Batch.of(groups, batch_metrics(groups, version))


def fetch(refs: list[Any]) -> list[Group]:
    """Groups from a batch's references (values pass through)."""
    import ray

    return [ray.get(r) if isinstance(r, ray.ObjectRef) else r for r in refs]


def to_dict(cfg: SlimeConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
