"""`env=reward_fn`: TRL-style reward functions on a dataset (envs/reward_fn.py, envs/dataset.py).

The environment alone (no engine), its failures through the episode loop with a scripted engine,
the start-up checks, dataset columns reaching the functions, and the worked example through the
real loop (tiny model, 2 steps; marked slow).
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest
from test_episode import ScriptedEngine

from envs.base import Action
from envs.dataset import load_tasks
from envs.registry import load_env_class
from envs.reward_fn import RewardFnEnv, load_reward_function
from rollout.chat import ChatFormat
from rollout.episode import run_env_group
from slime.core.config import DatasetConfig, EnvConfig, RolloutConfig
from slime.core.types import SamplingParams, Status, Task

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_DATA = REPO / "examples" / "reward_fn" / "data.jsonl"
CORRECT = "examples.reward_fn.rewards:correct"
SHORT = "examples.reward_fn.rewards:short"
HERE = __name__


async def score(env: RewardFnEnv, task: Task, reply: str):
    await env.reset(task)
    return await env.step(Action(content=reply))


# Reward functions used by the tests (addressed by dotted path as users would).
CALLS: list[dict] = []


def record(prompts, completions, **kwargs):
    CALLS.append({"prompts": prompts, "completions": completions, **kwargs})
    return [0.25]


async def async_len(prompts, completions, **kwargs):
    await asyncio.sleep(0)
    return [float(len(completions[0] if isinstance(completions[0], str) else completions[0][0]["content"]))]


def named_only(completions, answer):  # no **kwargs: gets only the columns it names
    return [1.0 if completions[0].strip() == answer[0] else 0.0]


def not_applicable(completions, **kwargs):
    return [None]


def nan_reward(completions, **kwargs):
    return [math.nan]


def two_values(prompts, completions, **kwargs):
    return [1.0, 0.0]


def not_a_number(prompts, completions, **kwargs):
    return ["high"]


def a_float(prompts, completions, **kwargs):
    return 1.0


def boom_on_boom(prompts, completions, **kwargs):
    if "boom" in completions[0]:
        raise ZeroDivisionError("the judge divided by zero")
    return [1.0]


def needs_hint(completions, hint):
    return [0.0]


def positional_only(prompts, completions, /):
    return [0.0]


def no_completions(prompts, answer):
    return [0.0]


class NotAFunction:
    pass


NOT_CALLABLE = 3

ARITH = Task(id="a1", prompt="What is 2 + 3?", env="reward_fn", env_args={"answer": "5", "level": 1})


# --------------------------------------------------------------------------------- the env alone
def test_example_dataset_and_rewards():
    tasks = load_tasks(EnvConfig(name="reward_fn", dataset=DatasetConfig(path=str(EXAMPLE_DATA))), seed=0)
    assert len(tasks) == 40 and all(set(t.env_args) == {"answer"} for t in tasks)
    task = tasks[0]
    assert (
        task.id == "arith-00"
        and task.prompt.startswith("What is 16 + 29?")
        and task.env_args["answer"] == "45"
    )

    env = RewardFnEnv(reward=[CORRECT, SHORT], reward_weights=[1.0, 0.5])
    messages = asyncio.run(env.reset(task))
    assert messages == [{"role": "user", "content": task.prompt}]
    right = asyncio.run(env.step(Action(content="45")))
    assert right.done and right.observation == [] and right.reward == 1.5
    assert right.info == {"rewards": {"correct": 1.0, "short": 1.0}}
    # 9 words: correct (the last number is 45), short = (13 - 9) / 10.
    wordy = asyncio.run(score(env, task, "16 plus 29 is, as you can see, 45"))
    assert wordy.info["rewards"] == {"correct": 1.0, "short": pytest.approx(0.4)}
    assert wordy.reward == pytest.approx(1.2)
    wrong = asyncio.run(score(env, task, "44"))
    assert wrong.reward == 0.5 and wrong.info["rewards"]["correct"] == 0.0


def test_trl_call_convention_string_and_chat_prompts():
    CALLS.clear()
    env = RewardFnEnv(reward=f"{HERE}:record", system_prompt="Be brief.")
    messages = asyncio.run(env.reset(ARITH))
    assert messages[0] == {"role": "system", "content": "Be brief."}
    result = asyncio.run(env.step(Action(content="5")))
    assert result.reward == 0.25 and result.info["rewards"] == {"record": 0.25}
    # Lists of length 1, the dataset's prompt as it is, every column.
    assert CALLS[-1] == {"prompts": ["What is 2 + 3?"], "completions": ["5"], "answer": ["5"], "level": [1]}

    chat = Task(id="c1", prompt=[{"role": "user", "content": "2+3?"}], env_args={"answer": "5"})
    asyncio.run(score(env, chat, "5"))
    assert CALLS[-1]["prompts"] == [[{"role": "user", "content": "2+3?"}]]
    assert CALLS[-1]["completions"] == [[{"role": "assistant", "content": "5"}]]

    only_answer = RewardFnEnv(reward=f"{HERE}:record", columns=["answer"])
    asyncio.run(score(only_answer, ARITH, "5"))
    assert set(CALLS[-1]) == {"prompts", "completions", "answer"}


def test_async_named_only_and_missing_values():
    env = RewardFnEnv(
        reward=[f"{HERE}:async_len", f"{HERE}:named_only", f"{HERE}:not_applicable", f"{HERE}:nan_reward"],
        reward_weights=[0.5, 2.0, 3.0, 4.0],
    )
    result = asyncio.run(score(env, ARITH, "5"))
    assert result.info["rewards"] == {
        "async_len": 1.0,
        "named_only": 1.0,
        "not_applicable": None,
        "nan_reward": None,
    }
    assert result.reward == 0.5 * 1.0 + 2.0 * 1.0  # None and NaN add nothing (TRL's nan-sum)
    # Callables work too (programmatic use); a name shared by two functions falls back to full names.
    twice = RewardFnEnv(reward=[named_only, f"{HERE}:named_only"])
    assert set(asyncio.run(score(twice, ARITH, "5")).info["rewards"]) == {"named_only", f"{HERE}:named_only"}


@pytest.mark.parametrize(
    ("fn", "reason"),
    [
        ("two_values", "returned 2 values for 1 completion"),
        ("not_a_number", "returned a str, not a number"),
        ("a_float", "returned float; it must return a list"),
        ("boom_on_boom", "raised ZeroDivisionError: the judge divided by zero"),
    ],
)
def test_bad_reward_results_raise_with_the_reason(fn, reason):
    env = RewardFnEnv(reward=f"{HERE}:{fn}")
    with pytest.raises(RuntimeError, match=reason) as err:
        asyncio.run(score(env, ARITH, "boom"))
    assert f"{HERE}:{fn}" in str(err.value)


def test_a_missing_column_fails_the_episode_with_its_name():
    env = RewardFnEnv(reward=f"{HERE}:named_only")
    with pytest.raises(RuntimeError, match=r"needs column\(s\) answer, which task 'n1' does not pass"):
        asyncio.run(score(env, Task(id="n1", prompt="x", env_args={"solution": "5"}), "5"))
    listed = RewardFnEnv(reward=f"{HERE}:record", columns=["answer"])
    with pytest.raises(ValueError, match=r"task 'n1' has no column\(s\) answer named in env.kwargs.columns"):
        asyncio.run(listed.reset(Task(id="n1", prompt="x", env_args={"solution": "5"})))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, r"env.kwargs.reward is required: set env.kwargs.reward=\[package.module:function"),
        ({"reward": "no_colon"}, r"env.kwargs.reward='no_colon' must look like package.module:function"),
        ({"reward": "no_such_pkg.mod:fn"}, r"env.kwargs.reward='no_such_pkg.mod:fn': cannot import module"),
        ({"reward": f"{HERE}:missing"}, rf"env.kwargs.reward='{HERE}:missing': module .* has no attribute"),
        ({"reward": f"{HERE}:NOT_CALLABLE"}, r"env.kwargs.reward: .*NOT_CALLABLE is a int, not a function"),
        ({"reward": f"{HERE}:NotAFunction"}, r"NotAFunction is a type, not a function"),
        (
            {"reward": f"{HERE}:no_completions"},
            r"does not accept `completions`; write it as fn\(prompts, comp",
        ),
        ({"reward": f"{HERE}:positional_only"}, r"positional-only parameters \(prompts, completions\)"),
        ({"reward": [CORRECT, SHORT], "reward_weights": [1.0]}, r"reward_weights has 1 entries for 2 reward"),
        ({"reward": CORRECT, "reward_weights": ["x"]}, r"env.kwargs.reward_weights: 'x' .* must be a finite"),
        ({"reward": f"{HERE}:needs_hint", "columns": ["answer"]}, r"requires hint, which env.kwargs.columns"),
        ({"reward": CORRECT, "columns": "answer"}, r"env.kwargs.columns must be a list of column names"),
        ({"reward": 7}, r"env.kwargs.reward: 7 is neither a string nor a callable"),
    ],
)
def test_load_time_checks_name_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RewardFnEnv(**kwargs)


def test_signature_summary():
    f = load_reward_function(f"{HERE}:named_only", weight=2)
    assert (f.weight, f.takes_prompts, f.takes_any_column, f.is_async) == (2.0, False, False, False)
    assert f.required == {"completions", "answer"}
    g = load_reward_function(f"{HERE}:async_len")
    assert g.is_async and g.takes_prompts and g.takes_any_column


def test_registered_and_checked_at_startup(tmp_path):
    from slime.api import compose_config
    from slime.train import check_env

    assert load_env_class("reward_fn") is RewardFnEnv
    base = ["+experiment=tiny", "env=reward_fn", f"env.dataset.path={EXAMPLE_DATA}"]
    cfg = compose_config([*base, f"env.kwargs.reward=[{CORRECT},{SHORT}]"], str(tmp_path))
    assert cfg.env.kwargs["reward"] == [CORRECT, SHORT]
    assert check_env(cfg) == 40
    bad = compose_config([*base, "env.kwargs.reward=[examples.reward_fn.rewards:corect]"], str(tmp_path))
    with pytest.raises(ValueError, match=r"do not construct reward_fn: env.kwargs.reward=.*has no attribute"):
        check_env(bad)


# ------------------------------------------------------------------- failures in the episode loop
@pytest.fixture(scope="module")
def chat(tokenizer) -> ChatFormat:
    return ChatFormat(tokenizer)


async def test_a_raising_reward_fails_only_its_episode(chat):
    engine = ScriptedEngine(chat, ["5", "boom", "5", "5"])
    cfg = RolloutConfig(max_turns=1, max_tokens_per_turn=16, max_total_tokens=256, step_timeout_s=5.0)
    env_kwargs = {"reward": [f"{HERE}:boom_on_boom", CORRECT], "reward_weights": [0.5, 1.0]}
    trajs = await run_env_group(
        engine, lambda: RewardFnEnv(**env_kwargs), ARITH, 4, chat, cfg, SamplingParams(max_tokens=16)
    )
    failed = [t for t in trajs if t.status is Status.FAILED]
    assert len(failed) == 1 and failed[0].reward == 0.0
    assert "ZeroDivisionError: the judge divided by zero" in failed[0].info["error"]
    assert f"{HERE}:boom_on_boom" in failed[0].info["error"]
    ok = [t for t in trajs if t.status is Status.COMPLETED]
    assert len(ok) == 3 and all(t.reward == 1.5 for t in ok)
    assert all(t.info["env"]["rewards"] == {"boom_on_boom": 1.0, "correct": 1.0} for t in ok)


# ------------------------------------------------------------------------------- dataset columns
def test_flat_columns_join_env_args(tmp_path):
    rows = [
        {"prompt": "1+1?", "answer": "2", "env_args": {"answer": "two"}},  # env_args wins
        {"prompt": "2+2?", "answer": "4", "source": "gsm"},
    ]
    path = tmp_path / "flat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = load_tasks(EnvConfig(name="reward_fn", dataset=DatasetConfig(path=str(path))), seed=0)
    assert tasks[0].env_args == {"answer": "two", "source": None}  # datasets fills absent columns
    assert tasks[1].env_args == {"answer": "4", "source": "gsm"}


def test_save_to_disk_directories_and_splits(tmp_path):
    import datasets

    rows = {"prompt": ["a?", "b?"], "answer": ["1", "2"]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "single"))
    tasks = load_tasks(EnvConfig(name="reward_fn", dataset=DatasetConfig(path=str(tmp_path / "single"))), 0)
    assert [(t.id, t.env_args) for t in tasks] == [
        ("single-0", {"answer": "1"}),
        ("single-1", {"answer": "2"}),
    ]

    both = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict(rows), "test": datasets.Dataset.from_dict({"prompt": ["c?"]})}
    )
    both.save_to_disk(str(tmp_path / "dd"))

    def load(spec: str):
        return load_tasks(EnvConfig(name="reward_fn", dataset=DatasetConfig(path=spec)), 0)

    assert [t.prompt for t in load(str(tmp_path / "dd"))] == ["a?", "b?"]  # train by default
    assert [t.prompt for t in load(f"{tmp_path / 'dd'}@test")] == ["c?"]
    with pytest.raises(ValueError, match=r"choose a split with a '@split' suffix \(splits: train, test\)"):
        load(f"{tmp_path / 'dd'}@validation")
    with pytest.raises(ValueError, match="a single dataset has no splits"):
        load(f"{tmp_path / 'single'}@test")


def test_hub_ids_go_to_datasets(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict({"prompt": ["q?"], "answer": ["1"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    for spec in ("openai/gsm8k:main@test", "someone/data"):
        tasks = load_tasks(EnvConfig(name="reward_fn", dataset=DatasetConfig(path=spec)), 0)
        assert tasks[0].env_args == {"answer": "1"}
    assert calls == [("openai/gsm8k", "main", "test"), ("someone/data", None, "train")]
    with pytest.raises(ValueError, match="unsupported file type '.csv'"):
        load_tasks(EnvConfig(name="reward_fn", dataset=DatasetConfig(path="data/x.csv")), 0)


# ------------------------------------------------------------------------------ the real loop
@pytest.mark.slow
def test_worked_example_through_the_real_loop(tmp_path, ray_cluster):
    from slime import api

    run_dir = tmp_path / "run"
    rows = api.run(
        [
            "+experiment=tiny",
            "env=reward_fn",
            f"env.dataset.path={EXAMPLE_DATA}",
            f"env.kwargs.reward=[{CORRECT},{SHORT}]",
            "env.kwargs.reward_weights=[1.0,0.5]",
            "trainer.steps=2",
        ],
        run_dir=str(run_dir),
    )
    assert [r["step"] for r in rows] == [0, 1]
    assert all(r["episode/failed"] == 0 for r in rows)
    groups = [json.loads(line) for line in (run_dir / "buffer" / "groups.jsonl").read_text().splitlines()]
    assert groups
    answers = {
        json.loads(line)["id"]: json.loads(line)["answer"] for line in EXAMPLE_DATA.read_text().splitlines()
    }
    for g in groups:
        assert g["task"]["env_args"] == {"answer": answers[g["task"]["id"]]}
        for t in g["trajectories"]:
            parts = t["info"]["env"]["rewards"]
            assert set(parts) == {"correct", "short"} and 0.0 <= parts["short"] <= 1.0
            assert t["reward"] == pytest.approx(parts["correct"] + 0.5 * parts["short"])
    trained = [t["reward"] for g in groups for t in g["trajectories"]]
    assert any(r > 0 for r in trained)  # the tiny model's short replies earn the format reward
    assert 0.0 <= rows[0]["reward/mean"] <= 1.5
