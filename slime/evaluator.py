"""Evaluation during training: held-out tasks on the rollout engines, beside the training rollouts.

At step 0, every `eval.every` steps and after the last step, the evaluator sends `eval.num_tasks`
tasks (from `eval.dataset`, or the environment's generator with a seed disjoint from training's) to
the live rollout workers, `eval.n` samples each at the evaluation's own sampling (greedy by default).
The controller does not wait for it: the evaluation shares the engines with training episodes and
its row (`"eval": true`, `eval/...` keys, the `step` it started at) is logged to metrics.jsonl and
wandb when it finishes. One evaluation runs at a time; the final one is awaited before the run ends.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from typing import Any

from slime.core.config import SlimeConfig
from slime.core.types import Task
from slime.fleet import RolloutFleet
from slime.metrics import MetricsLogger, eval_metrics

log = logging.getLogger("slime")

EVAL_SEED_OFFSET = 7_919  # generated evaluation tasks use seed + this: not the training stream


def eval_tasks(cfg: SlimeConfig) -> list[Task]:
    """The held-out tasks: the first `eval.num_tasks` of `eval.dataset`, or of the environment's
    generator seeded apart from training."""
    from envs.dataset import load_tasks

    env = copy.deepcopy(cfg.env)
    if cfg.eval.dataset:
        env.dataset.path = cfg.eval.dataset
    else:
        env.dataset.path = ""
        env.dataset.num_tasks = cfg.eval.num_tasks
    return load_tasks(env, cfg.seed + EVAL_SEED_OFFSET)[: cfg.eval.num_tasks]


class Evaluator:
    """Starts evaluations when they are due and logs each one's row when it finishes."""

    def __init__(self, cfg: SlimeConfig, fleet: RolloutFleet, logger: MetricsLogger) -> None:
        self.cfg = cfg.eval
        self.total_steps = cfg.trainer.steps
        self.fleet = fleet
        self.logger = logger
        self.tasks = eval_tasks(cfg)
        self.rows: list[dict[str, Any]] = []
        self._running: asyncio.Task | None = None

    def due(self, steps_done: int) -> bool:
        every = self.cfg.every
        return bool(every) and (steps_done % every == 0 or steps_done == self.total_steps)

    def maybe_start(self, steps_done: int, version: int) -> None:
        if not self.due(steps_done):
            return
        if self._running is not None and not self._running.done():
            log.warning("eval at step %d skipped: the previous evaluation is still running", steps_done)
            return
        self._running = asyncio.create_task(self._evaluate(steps_done, version), name=f"eval-{steps_done}")

    async def _evaluate(self, steps_done: int, version: int) -> None:
        t0 = time.perf_counter()
        groups = await self.fleet.evaluate(self.tasks, self.cfg.n, self.cfg.temperature, self.cfg.top_p)
        row = {
            "step": steps_done,
            "version": version,
            "eval": True,
            **eval_metrics(groups, self.cfg.success),
            "eval/time_s": time.perf_counter() - t0,
        }
        self.logger.log(row)
        self.rows.append(row)
        log.info(
            "eval at step %d: reward %.3f, pass@%d %.3f (%d tasks)",
            steps_done,
            row["eval/reward_mean"],
            self.cfg.n,
            row["eval/pass@k"],
            len(groups),
        )

    async def finish(self) -> None:
        """Wait for the evaluation in flight (the run's last one)."""
        if self._running is not None:
            await self._running
