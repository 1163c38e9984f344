"""Faults through the whole Ray loop (vLLM engines, DeepSpeed trainer, replay buffer).

- An environment that raises (or returns malformed values) on some tasks fails exactly those episodes:
  the run finishes, `episode/failed` counts them, and no batch holds any of them.
- A rollout worker whose run loop dies ends the run with the worker's own traceback, not a hang.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from envs.dataset import load_tasks
from envs.flaky import FlakyEnv
from rollout.worker import TaskSchedule
from slime import api
from tests.e2e_envs import WORKER_BUG_MESSAGE

TINY = ["+experiment=tiny"]
GROUP_SIZE = 4  # rollout.group_size of +experiment=tiny
IN_FLIGHT = (
    4  # rollout.num_workers x rollout.max_concurrent_groups of +experiment=tiny: groups started, not put
)
FLAKY = [
    "env.name=flaky",
    "++env.kwargs.failure_rate=0.4",
    "++env.kwargs.modes=[raise,malformed]",
    "++env.kwargs.num_steps=1",
    "++env.kwargs.seed=7",  # the plan is a function of (seed, task id): every episode of a task agrees
]


def _plan(env_kwargs: dict[str, Any], task) -> tuple[str, str] | None:
    """What the flaky env decides for `task`, read back from a fresh instance."""
    env = FlakyEnv(**env_kwargs)
    try:
        asyncio.run(env.reset(task))
    except RuntimeError:
        pass
    return env.planned


@pytest.mark.slow
def test_a_raising_env_fails_exactly_its_episodes(tmp_path, ray_cluster):
    overrides = TINY + FLAKY + ["trainer.steps=3"]
    cfg = api.compose_config(overrides, str(tmp_path))
    schedule = TaskSchedule(load_tasks(cfg.env, cfg.seed), cfg.seed, cfg.env.dataset.shuffle)
    fails = [_plan(cfg.env.kwargs, schedule(t)) is not None for t in range(200)]
    # The buffer gives up after 16 failed groups in a row (a broken env); this seed has no such run.
    assert "True" * 8 not in "".join(map(str, fails)) and 0.2 < sum(fails) / len(fails) < 0.6

    rows = api.run(overrides, run_dir=str(tmp_path))
    assert [r["version"] for r in rows] == [1, 2, 3]
    # Nothing trained on a failed episode: every batch is full, every episode in it scored 1.0.
    for r in rows:
        assert r["batch/trajectories"] == 4 * GROUP_SIZE and r["reward/mean"] == 1.0, r

    # Every failure is a whole group of a planned task; the failed episodes were counted.
    failed_groups = sum(r["buffer/dropped_failed"] for r in rows)
    assert sum(r["episode/failed"] for r in rows) == GROUP_SIZE * failed_groups > 0
    issued = int(rows[-1]["buffer/issued"])  # read in the same call as the last counters
    planned = sum(fails[:issued])
    # The groups put before that call: all issued tickets but those still running (at most IN_FLIGHT).
    assert planned - IN_FLIGHT <= failed_groups <= planned, (failed_groups, planned, issued)

    # Accepted (recorded) groups: exactly the tasks planned to succeed, each with all its episodes.
    recorded = [json.loads(x) for x in (tmp_path / "buffer" / "groups.jsonl").read_text().splitlines()]
    accepted = {g["ticket"] for g in recorded}
    for g in recorded:
        assert g["task"]["id"] == schedule(g["ticket"]).id
        assert not fails[g["ticket"]], g["ticket"]
        assert len(g["trajectories"]) == GROUP_SIZE
        assert all(t["status"] != "failed" for t in g["trajectories"])
    not_yet_put = [t for t in range(issued) if not fails[t] and t not in accepted]
    assert len(not_yet_put) <= IN_FLIGHT, not_yet_put


@pytest.mark.slow
@pytest.mark.timeout(600)  # a hang fails here instead of at the suite's limit
def test_a_dying_rollout_worker_ends_the_run_with_its_traceback(tmp_path, ray_cluster):
    # No restarts: the restarted worker would die the same way (each restart costs an engine start).
    overrides = TINY + ["env.name=tests.e2e_envs:CrashingEnv", "trainer.steps=2", "rollout.max_restarts=0"]
    with pytest.raises(RuntimeError) as info:
        api.run(overrides, run_dir=str(tmp_path))
    message = str(info.value)
    assert message.startswith("rollout worker 0 failed") and "rollout.max_restarts=0" in message, message[
        :500
    ]
    # The worker's traceback, down to the line that raised, travels with the error.
    assert f"WorkerBug: {WORKER_BUG_MESSAGE}" in message, message[-2000:]
    assert "e2e_envs.py" in message and "in step" in message, message[-2000:]
    assert not (tmp_path / "metrics.jsonl").exists() or not (tmp_path / "metrics.jsonl").read_text()
