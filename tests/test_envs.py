"""envs/: the contract checker, registry, dataset loading, built-in environments, sandbox, CLI."""

from __future__ import annotations

import asyncio
import json
import math
from importlib.metadata import EntryPoint

import pytest

from envs import registry
from envs.base import Action, Environment, StepResult, ToolCall, check_environment_class, coerce_step_result
from envs.calculator import CalculatorEnv, CalculatorError, format_number, make_problem, safe_eval
from envs.dataset import load_tasks
from envs.flaky import FlakyEnv
from envs.guess_number import GuessNumberEnv
from envs.math_env import MathEnv, answers_match, extract_answer, parse_number
from envs.reasoning_gym_env import ReasoningGymEnv
from envs.registry import EnvNotFoundError, list_envs, load_env_class
from envs.sandbox import run_python
from envs.target import TargetEnv, lowercase_word_fraction
from slime.core.config import DatasetConfig, EnvConfig
from slime.core.types import Task

BUILTINS = ["calculator", "math", "guess_number", "reasoning_gym", "target", "flaky"]


def act(text: str, calls: list[ToolCall] | None = None) -> Action:
    return Action(content=text, tool_calls=calls or [])


# ---------------------------------------------------------------------------------------- contract
class Good(Environment):
    tools = []

    async def reset(self, task):
        return task.messages()

    async def step(self, action):
        return StepResult([], 1.0, True, {})


class SyncReset:
    tools: list = []

    def reset(self, task):
        return []

    async def step(self, action):
        return StepResult([], 0.0, True, {})


class NoStep:
    async def reset(self, task):
        return []


class NotImplemented_(Environment):
    async def reset(self, task):
        return []


class BadMakeTasks(Good):
    def make_tasks(self, num, seed):
        return []


class BadTools(Good):
    tools = [{"type": "function", "function": {"description": "no name"}}]


class SyncClose(Good):
    def close(self):
        pass


class NoArgStep:
    async def reset(self, task):
        return []

    async def step(self):
        return None


@pytest.mark.parametrize(
    "cls, message",
    [
        (SyncReset, "SyncReset.reset must be async"),
        (NoStep, "NoStep has no step method"),
        (NotImplemented_, "NotImplemented_ does not implement step"),
        (BadMakeTasks, "make_tasks must be a classmethod"),
        (BadTools, "function.name must be a non-empty string"),
        (SyncClose, "close must be async"),
        (NoArgStep, "step must take one argument"),
        (42, "must be a class"),
    ],
)
def test_check_environment_class_names_the_problem(cls, message):
    with pytest.raises((TypeError, ValueError), match=message):
        check_environment_class(cls)


def test_builtins_satisfy_the_contract():
    check_environment_class(Good)
    for name in BUILTINS:
        check_environment_class(load_env_class(name))


def test_coerce_step_result():
    assert coerce_step_result(([], 1, False, None)) == StepResult([], 1.0, False, {})
    with pytest.raises(ValueError, match="finite"):
        coerce_step_result(StepResult([], math.inf, True))
    with pytest.raises(TypeError, match="bool"):
        coerce_step_result(StepResult([], True, True))  # a bool reward is a bug, not 1.0


# ---------------------------------------------------------------------------------------- registry
def test_registry_short_names_dotted_paths_and_errors():
    assert load_env_class("calculator") is CalculatorEnv
    assert load_env_class("envs.math_env:MathEnv") is MathEnv
    assert load_env_class(f"{__name__}:Good") is Good
    with pytest.raises(EnvNotFoundError) as e:
        load_env_class("no_such_env")
    for name in BUILTINS:
        assert name in str(e.value)
    with pytest.raises(EnvNotFoundError, match="cannot import module"):
        load_env_class("no.such.module:Env")
    with pytest.raises(EnvNotFoundError, match="has no attribute"):
        load_env_class("envs.math_env:Nope")
    with pytest.raises(TypeError, match="reset must be async"):
        load_env_class(f"{__name__}:SyncReset")


def test_registry_entry_points(monkeypatch):
    eps = [
        EntryPoint(name="plugin_env", value=f"{__name__}:Good", group=registry.ENTRY_POINT_GROUP),
        EntryPoint(name="broken", value="nowhere.at_all:Env", group=registry.ENTRY_POINT_GROUP),
        EntryPoint(name="math", value=f"{__name__}:Good", group=registry.ENTRY_POINT_GROUP),
    ]
    monkeypatch.setattr(registry, "entry_points", lambda group: [ep for ep in eps if ep.group == group])
    assert load_env_class("plugin_env") is Good
    assert load_env_class("math") is MathEnv  # built-ins win
    with pytest.raises(EnvNotFoundError, match="entry point 'broken'"):
        load_env_class("broken")
    listed = list_envs()
    assert listed["plugin_env"] == f"{__name__}:Good"
    assert listed["math"] == "envs.math_env:MathEnv" and "math (entry point, shadowed)" in listed
    assert all(name in listed for name in BUILTINS)


def test_cli_list_and_check(capsys):
    from envs.__main__ import main

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in BUILTINS:
        assert name in out
    assert main(["check", "calculator"]) == 0
    assert "tools (default kwargs): calculator" in capsys.readouterr().out
    assert main(["check", "no_such_env"]) == 1
    assert "unknown environment" in capsys.readouterr().err
    assert main(["sample", "math", "-n", "2"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 2 and rows[0]["env_args"]["answer"]


# ----------------------------------------------------------------------------------------- dataset
def test_load_tasks_from_generators():
    for name in ["calculator", "math", "guess_number", "target", "flaky"]:
        tasks = load_tasks(EnvConfig(name=name, dataset=DatasetConfig(num_tasks=7)), seed=3)
        again = load_tasks(EnvConfig(name=name, dataset=DatasetConfig(num_tasks=7)), seed=3)
        other = load_tasks(EnvConfig(name=name, dataset=DatasetConfig(num_tasks=7)), seed=4)
        assert len(tasks) == 7 and len({t.id for t in tasks}) == 7
        assert [(t.prompt, t.env_args) for t in tasks] == [(t.prompt, t.env_args) for t in again]
        if name != "flaky":
            assert [t.env_args or t.prompt for t in tasks] != [t.env_args or t.prompt for t in other]
        assert all(t.env == name for t in tasks)


def test_load_tasks_from_jsonl_and_parquet(tmp_path):
    rows = [
        {"id": "a", "prompt": "What is 2+2?", "env_args": {"answer": "4"}},
        {
            "id": "b",
            "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}],
            "env_args": {"answer": "2"},
        },
    ]
    jsonl = tmp_path / "tasks.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    tasks = load_tasks(EnvConfig(name="math", dataset=DatasetConfig(path=str(jsonl))), seed=0)
    assert [t.id for t in tasks] == ["a", "b"]
    assert tasks[0].env_args == {"answer": "4"} and tasks[1].messages()[0]["role"] == "system"

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "prompt": ["q1", "q2"],
            "env_args": [json.dumps({"answer": "1", "x": [1]}), json.dumps({"answer": "2"})],
        }
    )
    parquet = tmp_path / "tasks.parquet"
    pq.write_table(table, parquet)
    tasks = load_tasks(EnvConfig(name="math", dataset=DatasetConfig(path=str(parquet))), seed=0)
    assert [t.id for t in tasks] == ["tasks-0", "tasks-1"]  # ids default to <stem>-<row>
    assert tasks[0].env_args == {"answer": "1", "x": [1]} and tasks[1].env_args == {"answer": "2"}


def test_load_tasks_errors(tmp_path):
    missing_col = tmp_path / "bad.jsonl"
    missing_col.write_text(json.dumps({"id": "a", "question": "hi"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl.*no 'prompt' column"):
        load_tasks(EnvConfig(name="math", dataset=DatasetConfig(path=str(missing_col))), seed=0)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_tasks(EnvConfig(name="math", dataset=DatasetConfig(path=str(tmp_path / "nope.jsonl"))), seed=0)
    with pytest.raises(ValueError, match="unsupported file type"):
        load_tasks(EnvConfig(name="math", dataset=DatasetConfig(path=str(tmp_path / "x.csv"))), seed=0)
    with pytest.raises(ValueError, match="env.dataset is empty"):
        load_tasks(EnvConfig(name="math", dataset=DatasetConfig(num_tasks=0)), seed=0)
    dup = tmp_path / "dup.jsonl"
    dup.write_text("\n".join(json.dumps({"id": "a", "prompt": "p"}) for _ in range(2)) + "\n")
    with pytest.raises(ValueError, match="appears twice"):
        load_tasks(EnvConfig(name="math", dataset=DatasetConfig(path=str(dup))), seed=0)
    with pytest.raises(ValueError, match="does not generate tasks"):
        load_tasks(EnvConfig(name=f"{__name__}:Good"), seed=0)


def test_env_yaml_configs_validate():
    from pathlib import Path

    from omegaconf import OmegaConf

    folder = Path(__file__).resolve().parents[1] / "configs" / "env"
    for name in ["calculator", "math", "guess_number", "reasoning_gym", "target"]:
        cfg = OmegaConf.to_object(
            OmegaConf.merge(OmegaConf.structured(EnvConfig), OmegaConf.load(folder / f"{name}.yaml"))
        )
        assert cfg.name == name
        cls = load_env_class(cfg.name)
        cls(**cfg.kwargs)
        tasks = load_tasks(
            EnvConfig(
                name=cfg.name,
                kwargs=cfg.kwargs,
                dataset=DatasetConfig(num_tasks=3, kwargs=cfg.dataset.kwargs),
            ),
            seed=0,
        )
        assert len(tasks) == 3


# -------------------------------------------------------------------------------------- calculator
@pytest.mark.parametrize(
    "expr, value",
    [
        ("1 + 2 * 3", "7"),
        ("(1 + 2) * 3", "9"),
        ("0.1 + 0.2", "0.3"),
        ("10 / 4", "2.5"),
        ("-(3 - 5)", "2"),
        ("7 / 3", "2.333333333"),
        ("12 x 3 =", "36"),
        ("6 ÷ 4", "1.5"),
        (" 2*-3 ", "-6"),
    ],
)
def test_safe_eval(expr, value):
    assert format_number(safe_eval(expr)) == value


@pytest.mark.parametrize(
    "expr, reason",
    [
        ("__import__('os').system('true')", "unsupported element Call"),
        ("2 ** 100", "Pow"),
        ("a + 1", "Name"),
        ("1 / 0", "division by zero"),
        ("1 +", "cannot parse"),
        ("", "empty"),
        ("9" * 300, "longer than"),
        ("(1, 2)", "Tuple"),
        ("99999999999999999999 * 99999999999999999999 * 99999999999999999999", "too large"),
        ("[1][0]", "Subscript"),
        ("1 if 1 else 2", "IfExp"),
        ("True + 1", "Constant"),
    ],
)
def test_safe_eval_rejects(expr, reason):
    with pytest.raises(CalculatorError, match=reason):
        safe_eval(expr)


def test_calculator_problems_are_consistent():
    import random

    rng = random.Random(0)
    for digits in (1, 2, 3):
        for num_ops in (1, 2, 4):
            for words in (True, False):
                q, a = make_problem(rng, digits, num_ops, allow_division=True, words=words)
                assert isinstance(a, int) and a >= 0
                if not words:
                    assert safe_eval(q.removeprefix("Compute ").rstrip(".")) == a
                else:
                    assert q.count("Then") == num_ops


async def test_calculator_env_flow():
    env = CalculatorEnv(tool_bonus=0.1, max_turns=3)
    task = Task(id="t", prompt="What is 6 * 7?", env_args={"answer": "42"})
    msgs = await env.reset(task)
    assert msgs[0]["role"] == "system" and msgs[1]["content"] == "What is 6 * 7?"
    call = ToolCall("calculator", {"expression": "6*7"}, id="call_0_0")
    r = await env.step(act("calling", [call, ToolCall("calculator", {"expression": 5}, id="call_0_1")]))
    assert not r.done and r.reward == 0.0
    assert r.observation == [
        {"role": "tool", "content": "42", "tool_call_id": "call_0_0", "name": "calculator"},
        {"role": "tool", "content": "5", "tool_call_id": "call_0_1", "name": "calculator"},
    ]
    r = await env.step(act("So the result is \\boxed{42}."))
    assert r.done and r.reward == pytest.approx(1.0) and r.info["correct"]
    # Wrong answer with a successful tool call: only the format bonus.
    env = CalculatorEnv(tool_bonus=0.1)
    await env.reset(task)
    await env.step(act("", [call]))
    assert (await env.step(act("Answer: 41"))).reward == pytest.approx(0.1)
    # Turn limit without an answer.
    env = CalculatorEnv(max_turns=2)
    await env.reset(task)
    assert not (await env.step(act("", [call]))).done
    r = await env.step(act("", [call]))
    assert r.done and r.reward == 0.0 and not r.info["answered"]
    with pytest.raises(ValueError, match="tool_bonus"):
        CalculatorEnv(tool_bonus=1.5)
    with pytest.raises(ValueError, match="format_bonus"):
        CalculatorEnv(tool_bonus=0.5, format_bonus=0.5)
    with pytest.raises(ValueError, match="unknown"):
        CalculatorEnv(tools=["shell"])


async def test_calculator_demonstrations(tokenizer):
    from envs.calculator import DEMONSTRATIONS
    from rollout.chat import ChatFormat

    for _, expression, answer in DEMONSTRATIONS:
        assert format_number(safe_eval(expression)) == answer
    env = CalculatorEnv(demonstrations=2)
    task = Task(id="t", prompt="What is 6 * 7?", env_args={"answer": "42"})
    msgs = await env.reset(task)
    roles = [m["role"] for m in msgs]
    assert roles == ["system"] + ["user", "assistant", "tool", "assistant"] * 2 + ["user"]
    assert msgs[-1]["content"] == "What is 6 * 7?" and msgs[4]["content"] == "Answer: 9"
    assert msgs[2]["tool_calls"][0]["function"]["arguments"] == {"expression": "6 + 3"}
    # Rendered for SmolLM2 (no native tool support): the example call in the model's call syntax.
    text = ChatFormat(tokenizer).prompt_text(msgs, env.tools)
    assert '<tool_call>[{"name": "calculator", "arguments": {"expression": "4 * 7"}}]</tool_call>' in text
    assert len(await CalculatorEnv().reset(task)) == 2  # none by default
    with pytest.raises(ValueError, match="demonstrations"):
        CalculatorEnv(demonstrations=len(DEMONSTRATIONS) + 1)


@pytest.mark.parametrize(
    ("reply", "reward", "formatted"),
    [
        ("Answer: 42", 1.0, True),
        ("6 * 7 = 42.\nAnswer: 42 apples", 1.0, True),
        ("Answer: 41", 0.2, True),  # the format alone
        ("The result is 42.", 0.8, False),  # correct, but not in the asked-for form
        ("Answer: forty-two", 0.0, False),
    ],
)
async def test_calculator_format_bonus(reply, reward, formatted):
    env = CalculatorEnv(format_bonus=0.2)
    await env.reset(Task(id="t", prompt="What is 6 * 7?", env_args={"answer": "42"}))
    r = await env.step(act(reply))
    assert r.done and r.reward == pytest.approx(reward) and r.info["formatted"] is formatted


async def test_calculator_python_tool():
    env = CalculatorEnv(tools=["calculator", "python"])
    assert [t["function"]["name"] for t in env.tools] == ["calculator", "python"]
    await env.reset(Task(id="t", prompt="q", env_args={"answer": "1"}))
    r = await env.step(act("", [ToolCall("python", {"code": "print(sum(range(10)))"}, id="c")]))
    assert r.observation[0]["content"] == "45" and r.info["tool_ok"] == 1


# -------------------------------------------------------------------------------------------- math
@pytest.mark.parametrize(
    "pred, ref",
    [
        ("0.5", "1/2"),
        ("\\frac{1}{2}", "0.5"),
        ("50%", "0.5"),
        ("\\dfrac{3}{4}", "3/4"),
        ("-\\frac{5}{4}", "-5/4"),
        ("1,000", "1000"),
        ("x = 5", "5"),
        ("$12$", "12"),
        ("12.0", "12"),
        ("0.333", "1/3"),
        ("\\boxed{7}", "7"),
        ("(3)", "3"),
        ("-2.50", "-5/2"),
        ("18.6", "93/5"),
        ("Paris", "paris"),
        ("\\text{Paris}.", "Paris"),
        ("4/6", "2/3"),
        ("50", "50%"),
    ],
)
def test_answers_match(pred, ref):
    assert answers_match(pred, ref)


@pytest.mark.parametrize(
    "pred, ref",
    [
        ("0.3", "1/3"),
        ("0.33", "1/3"),
        ("0.334", "1/3"),
        ("5", "6"),
        (None, "1"),
        ("", "1"),
        ("twelve", "12"),
        ("1/0", "1"),
        ("Lyon", "Paris"),
        ("-1/2", "1/2"),
    ],
)
def test_answers_do_not_match(pred, ref):
    assert not answers_match(pred, ref)


@pytest.mark.parametrize(
    "text, answer",
    [
        ("So 3 + 4 = 7. The answer is \\boxed{\\frac{7}{2}} or \\boxed{8}", "8"),
        ("<answer> 12 </answer>", "12"),
        ("We get 5 apples and 6 pears.\nAnswer: 11 fruits.", "11"),
        ("The final answer is 3/4.", "3/4"),
        ("First 10, then 20, finally 35", "35"),
        ("no numbers here", None),
        ("\\boxed{x^{2}}", "x^{2}"),
        ("Answer: ", None),  # nothing after the phrase (raised IndexError, failing the episode)
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_parse_number_percent_has_two_readings():
    from fractions import Fraction

    assert parse_number("50%") == [Fraction(1, 2), Fraction(50)]
    assert parse_number("abc") == []


async def test_math_env_generates_self_consistent_problems():
    tasks = MathEnv.make_tasks(50, seed=1, difficulty=2)
    assert {t.env_args["kind"] for t in tasks} == {"arithmetic", "fraction", "linear", "percent", "decimal"}
    for t in tasks:
        env = MathEnv()
        await env.reset(t)
        good = await env.step(act(f"Let me think. The answer is \\boxed{{{t.env_args['answer']}}}."))
        assert good.done and good.reward == 1.0, t
        env = MathEnv()
        await env.reset(t)
        assert (await env.step(act("\\boxed{123456789}"))).reward == 0.0
    with pytest.raises(ValueError, match="kinds"):
        MathEnv.make_tasks(3, 0, kinds=["calculus"])


async def test_math_env_require_boxed():
    env = MathEnv(require_boxed=True)
    await env.reset(Task(id="t", prompt="1+1?", env_args={"answer": "2"}))
    assert (await env.step(act("Answer: 2"))).reward == 0.0
    env = MathEnv(require_boxed=True)
    await env.reset(Task(id="t", prompt="1+1?", env_args={"answer": "2"}))
    assert (await env.step(act("\\boxed{2}"))).reward == 1.0


# ------------------------------------------------------------------------------------ guess_number
async def test_guess_number_feedback_and_rewards():
    env = GuessNumberEnv(max_guesses=3, shaping=0.3)
    await env.reset(Task(id="t", prompt="Guess", env_args={"target": 42, "low": 1, "high": 100}))
    r = await env.step(act("I guess 50"))
    assert (
        not r.done and r.observation[0]["role"] == "user" and "lower than 50" in r.observation[0]["content"]
    )
    r = await env.step(act("hmm"))
    assert "single integer" in r.observation[0]["content"] and "1 guess left" in r.observation[0]["content"]
    r = await env.step(act("42"))
    assert r.done and r.reward == pytest.approx(1 - 0.3 * 2 / 3) and r.info["solved"]
    env = GuessNumberEnv(max_guesses=2)
    await env.reset(Task(id="t", prompt="Guess", env_args={"target": 42}))
    assert "outside the range" in (await env.step(act("500"))).observation[0]["content"]
    r = await env.step(act("41"))
    assert r.done and r.reward == 0.0 and not r.info["solved"]
    tasks = GuessNumberEnv.make_tasks(20, seed=0, low=5, high=9)
    assert all(5 <= t.env_args["target"] <= 9 for t in tasks)


# ----------------------------------------------------------------------------------- reasoning_gym
async def test_reasoning_gym_adapter():
    tasks = ReasoningGymEnv.make_tasks(3, seed=1, task="leg_counting")
    assert len(tasks) == 3 and all(t.env_args["task"] == "leg_counting" for t in tasks)
    for t in tasks:
        env = ReasoningGymEnv()
        msgs = await env.reset(t)
        assert msgs[0]["role"] == "system" and "<answer>" in msgs[0]["content"]
        assert msgs[1]["content"] == t.prompt
        right = await env.step(act(f"Counting... <answer>{t.env_args['answer']}</answer>"))
        assert right.reward == 1.0 and right.done
        env = ReasoningGymEnv()
        await env.reset(t)
        assert (await env.step(act("<answer>-1</answer>"))).reward == 0.0
    # A task with a config, and JSON round-trip of the task (as a recorded buffer would store it).
    tasks = ReasoningGymEnv.make_tasks(2, seed=0, task="basic_arithmetic", min_terms=2, max_terms=2)
    t = Task(**json.loads(json.dumps(tasks[0].__dict__)))
    env = ReasoningGymEnv()
    await env.reset(t)
    assert (await env.step(act(f"<answer>{t.env_args['answer']}</answer>"))).reward == 1.0
    with pytest.raises(ValueError, match="reasoning_gym cannot create"):
        ReasoningGymEnv.make_tasks(2, seed=0, task="no_such_task")


# ------------------------------------------------------------------------------------------ target
async def test_target_reward():
    assert lowercase_word_fraction("apple banana cherry") == 1.0
    assert lowercase_word_fraction("apple Zebra") == 0.5
    assert lowercase_word_fraction("") == 0.0 and lowercase_word_fraction("   ") == 0.0
    assert lowercase_word_fraction("apple zebra Zoo", max_words=2) == 1.0
    assert (
        lowercase_word_fraction("word, fine café x2 ok") == 0.4
    )  # punctuation, accents, digits break a word
    env = TargetEnv()
    tasks = TargetEnv.make_tasks(4, seed=0)
    assert "lowercase" in tasks[0].prompt
    await env.reset(tasks[0])
    r = await env.step(act("magic lamps glow, Zany yaks"))
    assert r.done and r.reward == pytest.approx(3 / 5) and r.observation == [] and r.info["words"] == 5
    with pytest.raises(ValueError, match="max_words"):
        TargetEnv(max_words=-1)


# ------------------------------------------------------------------------------------------- flaky
async def test_flaky_env_is_deterministic_with_a_seed():
    tasks = FlakyEnv.make_tasks(50, seed=0)
    plans = []
    for t in tasks:
        env = FlakyEnv(failure_rate=0.3, seed=9, modes=["raise"])
        try:
            await env.reset(t)
        except RuntimeError:
            pass
        plans.append(env.planned)
    again = []
    for t in tasks:
        env = FlakyEnv(failure_rate=0.3, seed=9, modes=["raise"])
        try:
            await env.reset(t)
        except RuntimeError:
            pass
        again.append(env.planned)
    assert plans == again and 5 <= sum(p is not None for p in plans) <= 25


# ----------------------------------------------------------------------------------------- sandbox
async def test_sandbox_runs_code_with_limits():
    ok = await run_python("import sys\nprint('hi', sys.flags.isolated)")
    assert ok.ok and ok.stdout == "hi 1\n"
    err = await run_python("raise ValueError('boom')")
    assert err.exit_code == 1 and "ValueError: boom" in err.as_tool_output()
    slow = await run_python("while True:\n    pass", timeout_s=0.5)
    assert slow.timed_out and slow.exit_code is None and "time limit" in slow.as_tool_output()
    big = await run_python("x = bytearray(1 << 31)", memory_mb=128)
    assert big.exit_code != 0 and "MemoryError" in big.stderr
    loud = await run_python("while True:\n    print('x' * 1000)", max_output_bytes=10_000)
    assert loud.output_truncated and len(loud.stdout) <= 10_000 and "output limit" in loud.as_tool_output()
    # Each run gets a fresh, empty temporary directory (only the script in it), removed afterwards with
    # whatever the code wrote there. Local imports: this file's import block belongs to other tests.
    import os
    import tempfile

    probe = "import os\nprint(os.getcwd())\nprint(sorted(os.listdir('.')))\nopen('f.txt', 'w').write('x')"
    first, second = await run_python(probe), await run_python(probe)
    dirs = []
    for res in (first, second):
        assert res.ok, res.stderr
        cwd, listing = res.stdout.splitlines()
        assert listing == "['main.py']", listing  # nothing left over from an earlier run
        assert os.path.dirname(cwd) == os.path.realpath(tempfile.gettempdir()), cwd
        assert cwd != os.path.realpath(os.getcwd())
        assert not os.path.exists(cwd), f"{cwd} was not removed"
        dirs.append(cwd)
    assert dirs[0] != dirs[1]


async def test_sandbox_output_cap_never_hangs():
    # Regression: a reader that stopped at the cap left its pipe paused, and Python 3.11's
    # Process.wait() never returned (it waits for every pipe's EOF). The race hit about 1 run in 5.
    for _ in range(8):
        loud = await asyncio.wait_for(
            run_python("while True:\n    print('x' * 5000)", max_output_bytes=4096), 30
        )
        assert loud.output_truncated and loud.exit_code is None


async def test_sandbox_escaped_grandchild_holding_the_pipes(monkeypatch):
    import envs.sandbox

    monkeypatch.setattr(envs.sandbox, "_DRAIN_GRACE_S", 0.5)
    code = (
        "import subprocess, sys\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(5)'], start_new_session=True)\n"
        "print('started')"
    )
    res = await asyncio.wait_for(run_python(code, timeout_s=1.0), 30)
    assert res.timed_out and "output lost" in res.stderr
