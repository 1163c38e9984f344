"""Long-horizon features through the real loop (Ray actors, vLLM, DeepSpeed): partial rollouts keep
slow episodes, a blocking environment fails only its episodes, and a context limit splits episodes
into segments that train. Tiny random model; the `long_tail` workload (envs/long_tail.py) with its
turns ended at the first space (`rollout.stop`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from envs.long_tail import LongTailEnv
from slime import api

LONG_TAIL = [
    "+experiment=tiny",
    "env=long_tail",
    "rollout.stop=[' ']",
    "rollout.max_turns=8",
    "rollout.max_tokens_per_turn=8",
    "logger.mode=disabled",
]


def _tasks_trained(run_dir: Path) -> list[str]:
    rows = [json.loads(line) for line in (run_dir / "buffer" / "trained.jsonl").read_text().splitlines()]
    return [t for r in rows for t in r["tasks"]]


@pytest.mark.slow
def test_partial_rollouts_train_slow_episodes_instead_of_dropping_them(tmp_path, ray_cluster):
    """A quarter of the tasks take 6 turns at 1 s per step (fast ones 1-2 turns at 0.05 s): with
    staleness 1 their groups finish after one or more pushes. Nothing is dropped as stale, episodes
    span versions, and the slow quarter is trained."""
    data = ["env.dataset.kwargs.slow_share=0.25", "env.dataset.kwargs.slow_step_s=1.0"]
    data += ["env.dataset.kwargs.fast_step_s=0.05", "env.dataset.num_tasks=64"]
    rows = api.run(
        [*LONG_TAIL, *data, "trainer.steps=8", "buffer.max_staleness=1", "buffer.stale_tokens=keep"],
        run_dir=str(tmp_path),
    )
    assert len(rows) == 8
    assert sum(r["buffer/dropped_stale"] for r in rows) == 0
    assert max(r["staleness/token_max"] for r in rows) >= 1
    assert sum(r["rollout/partial_episodes"] for r in rows) > 0
    assert all(r["rollout/tokens_lost/stale"] == 0 for r in rows)
    slow = {t.id for t in LongTailEnv.make_tasks(64, 0, slow_share=0.25) if t.env_args["slow"]}
    trained = _tasks_trained(tmp_path)
    assert sum(t in slow for t in trained) > 0  # the slow quarter is not starved


@pytest.mark.slow
def test_a_blocking_environment_fails_only_its_episodes(tmp_path, ray_cluster):
    """The first episode of every group blocks its step's thread for an hour (time.sleep): those
    episodes fail at rollout.step_timeout_s and the run goes on (before, the whole worker froze)."""
    rows = api.run(
        [
            "+experiment=tiny",
            "env.name=tests.long_envs:BlockingTarget",
            "rollout.step_timeout_s=3",
            "trainer.steps=3",
            "logger.mode=disabled",
        ],
        run_dir=str(tmp_path),
    )
    assert len(rows) == 3
    # One in four episodes blocked and failed; the groups train their others.
    assert sum(r["episode/failed"] for r in rows) >= 3
    assert all(8 <= r["batch/trajectories"] < 16 for r in rows)


@pytest.mark.slow
def test_a_context_limit_splits_episodes_into_segments_that_train(tmp_path, ray_cluster):
    """Tool results of 40 words and a 320-token context: older results are replaced and episodes go
    on in new segments, which the trainer trains with their episode's advantage."""
    rows = api.run(
        [
            *LONG_TAIL,
            "env.kwargs.result_words=40",
            "env.dataset.kwargs.slow_share=1.0",
            "env.dataset.kwargs.slow_step_s=0",
            "rollout.max_total_tokens=320",
            "rollout.context_policy=recent_tools",
            "rollout.keep_tool_results=1",
            "trainer.steps=3",
        ],
        run_dir=str(tmp_path),
    )
    assert max(r["episode/segments_mean"] for r in rows) > 1
    assert all(r["batch/trajectories"] > r["batch/episodes"] for r in rows)
    assert all(r["loss/policy"] == r["loss/policy"] and r["train/loss_tokens"] > 0 for r in rows)


@pytest.mark.slow
def test_the_main_job_runs_through_the_loop_on_the_tiny_model(tmp_path, ray_cluster):
    """`+experiment=agentic` (the parcel chain) as the README runs it, the tiny random model in
    SmolLM2's place: the worked examples render through the real chat format and engine, episodes
    end within their limits, and two steps complete (the random model rarely calls `track`, so its
    reward is ~0; the learning figures come from the real run, README "Measured")."""
    rows = api.run(
        ["+experiment=agentic", "model=tiny_dense", "trainer.steps=2", "rollout.max_tokens_per_turn=8"],
        run_dir=str(tmp_path),
    )
    assert [r["step"] for r in rows] == [0, 1]
    assert all(r["episode/count"] >= 16 and r["episode/failed"] == 0 for r in rows)
    assert min(r["episode/context_tokens_mean"] for r in rows) > 600  # two worked examples in the prompt
