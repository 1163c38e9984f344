"""env=openenv: OpenEnv (openenv-core 0.3.0) environments through slime's episode loop.

The example game (examples/openenv_guess: slime's guess_number as an OpenEnv Environment) in process
and over OpenEnv's own server (a real `uvicorn` process, one WebSocket session per episode), driven by
the scripted engine of test_openai_agent.py: each observation becomes a user turn, each reply the
action's `guess`, rewards and done come from the observations. Bad input: an id that is no OpenEnv
environment, an action field that cannot be chosen, a server that does not answer (at start-up) or
stops answering (that episode), a reward that is not a number. The two-step training runs are the
commands docs/environments.md gives.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import assert_start_up_fails
from test_openai_agent import ToolCallingEngine, check_alignment, mask_runs

from envs.openenv_env import OpenEnvEnv, OpenEnvError
from examples.openenv_guess.env import GuessEnvironment
from rollout.chat import ChatFormat
from rollout.episode import run_env_group
from slime import api
from slime.core.config import RolloutConfig
from slime.core.types import SamplingParams, Status

REPO = Path(__file__).resolve().parents[1]
IN_PROCESS = "examples.openenv_guess.env:GuessEnvironment"
CFG = RolloutConfig(max_tokens_per_turn=32, max_total_tokens=1024, max_turns=6, step_timeout_s=30.0)
SAMPLING = SamplingParams(max_tokens=32, temperature=1.0)


@pytest.fixture(scope="module")
def chat(tokenizer) -> ChatFormat:
    return ChatFormat(tokenizer)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*args: str) -> tuple[subprocess.Popen, str]:
    """`python -m examples.openenv_guess.server` on a free port, once it answers /health."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "examples.openenv_guess.server", "--port", str(port), *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            OpenEnvEnv.make_tasks(1, 0, base_url=url, connect_timeout_s=1.0)
            return proc, url
        except OpenEnvError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.3)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    proc, url = start_server()
    try:
        yield url
    finally:
        stop(proc)


def secret(task) -> int:
    """The number the example game holds for `task` (its reset seed decides it)."""
    game = GuessEnvironment()
    game.reset(seed=task.env_args["seed"])
    return game.target


async def play(chat: ChatFormat, replies: list[str], **kwargs):
    """One episode of the first task with the scripted `replies`."""
    (task,) = OpenEnvEnv.make_tasks(1, 0, **kwargs)
    eng = ToolCallingEngine(chat, replies)
    trajs = await run_env_group(eng, lambda: OpenEnvEnv(**kwargs), task, 1, chat, CFG, SAMPLING)
    return eng, task, trajs


@pytest.mark.parametrize("where", ["in process", "server"])
async def test_observations_become_turns_and_replies_become_actions(chat, where, request):
    kwargs = {"id": IN_PROCESS} if where == "in process" else {"base_url": request.getfixturevalue("server")}
    (task,) = OpenEnvEnv.make_tasks(1, 0, **kwargs)
    target = secret(task)
    low = 1 if target > 1 else 2
    replies = [f"My guess: {low}", "no idea", str(target)]
    eng = ToolCallingEngine(chat, replies)
    (traj,) = await run_env_group(eng, lambda: OpenEnvEnv(**kwargs), task, 1, chat, CFG, SAMPLING)
    assert traj.status == Status.COMPLETED, traj.info
    assert traj.reward == pytest.approx(1.0 - 0.5 * 2 / 7)  # solved at the third guess
    assert traj.turns == 3
    generated = [chat.tokenizer.encode(r, add_special_tokens=False) + [chat.turn_end_id] for r in replies]
    assert [traj.token_ids[a:b] for a, b in mask_runs(traj.loss_mask)] == generated
    check_alignment(traj, eng.version)
    text = chat.tokenizer.decode(traj.token_ids)
    assert "I am thinking of an integer between 1 and 100" in text
    hint = "higher" if target > low else "lower"
    assert f"My number is {hint} than {low}. 6 guesses left." in text
    assert "Please reply with a single integer between 1 and 100. 5 guesses left." in text
    # Each prompt continued the previous one token for token.
    for before, after in zip(eng.prompts, eng.prompts[1:], strict=False):
        assert after[: len(before)] == before


async def test_a_group_runs_concurrent_sessions_on_one_server(chat, server):
    (task,) = OpenEnvEnv.make_tasks(1, 0, base_url=server)
    eng = ToolCallingEngine(chat, [str(secret(task))] * 4)
    trajs = await run_env_group(eng, lambda: OpenEnvEnv(base_url=server), task, 4, chat, CFG, SAMPLING)
    assert [(t.status, t.reward, t.turns) for t in trajs] == [(Status.COMPLETED, 1.0, 1)] * 4


async def test_json_actions(chat):
    kwargs = {"id": IN_PROCESS, "action_format": "json"}
    (task,) = OpenEnvEnv.make_tasks(1, 0, **kwargs)
    replies = ["50", '{"gues": "1"}', f'```json\n{{"guess": "{secret(task)}"}}\n```']
    eng = ToolCallingEngine(chat, replies)
    (traj,) = await run_env_group(eng, lambda: OpenEnvEnv(**kwargs), task, 1, chat, CFG, SAMPLING)
    assert traj.status == Status.COMPLETED and traj.turns == 3 and traj.reward > 0
    text = chat.tokenizer.decode(traj.token_ids)
    assert "Your reply must be a JSON object of the action's fields, got int." in text
    assert "Your reply is not a valid action: ValidationError" in text


async def test_a_reward_that_is_not_a_number_fails_the_episode(chat):
    proc, url = start_server("--reward-kind", "text")
    try:
        eng, task, (traj,) = await play(chat, ["1", "2"], base_url=url)
    finally:
        stop(proc)
    assert traj.status == Status.FAILED and traj.reward == 0.0
    assert "reward is not a number: '0.0 points'" in traj.info["error"], traj.info["error"]


class StoppingEngine(ToolCallingEngine):
    """Stops the OpenEnv server while the model writes its first reply (after reset, before step)."""

    def __init__(self, chat: ChatFormat, replies: list[str], proc: subprocess.Popen) -> None:
        super().__init__(chat, replies)
        self.proc = proc

    async def generate(self, prompt_ids, sampling, request_id=None):
        stop(self.proc)
        return await super().generate(prompt_ids, sampling, request_id)


async def test_a_server_that_stops_answering_fails_only_that_episode(chat):
    proc, url = start_server()
    (task,) = OpenEnvEnv.make_tasks(1, 0, base_url=url)
    eng = StoppingEngine(chat, ["1"], proc)
    (traj,) = await run_env_group(eng, lambda: OpenEnvEnv(base_url=url), task, 1, chat, CFG, SAMPLING)
    assert traj.status == Status.FAILED and traj.turns == 1
    assert traj.info["error"].startswith("env.step raised"), traj.info["error"]
    assert len(traj.token_ids) > traj.prompt_len  # the reply stays on the failed episode
    # A fresh episode against the stopped server fails at reset, saying the server does not answer.
    eng = ToolCallingEngine(chat, ["1"])
    (traj,) = await run_env_group(eng, lambda: OpenEnvEnv(base_url=url), task, 1, chat, CFG, SAMPLING)
    assert traj.status == Status.FAILED and "Failed to connect to ws://127.0.0.1" in traj.info["error"]


async def test_an_environment_that_raises_fails_only_that_episode(chat, monkeypatch):
    def broken(self, action, timeout_s=None, **kwargs):
        raise RuntimeError("the game crashed")

    monkeypatch.setattr(GuessEnvironment, "step", broken)
    eng, task, (traj,) = await play(chat, ["1"], id=IN_PROCESS)
    assert traj.status == Status.FAILED and "RuntimeError: the game crashed" in traj.info["error"]


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ([], ["exactly one of env.id=package.module:EnvironmentClass", "env.kwargs.base_url"]),
        (
            ["env.id=examples.openenv_guess.nothing:Env"],
            ["cannot import module 'examples.openenv_guess.nothing'"],
        ),
        (["env.id=examples.openenv_guess.env:GuessAction"], ["not an OpenEnv Environment subclass"]),
        (
            ["env.id=" + IN_PROCESS, "env.kwargs.action_field=answer"],
            ["action_field='answer' is not a field"],
        ),
        (
            ["env.id=" + IN_PROCESS, "+env.kwargs.env_kwargs.high=0"],
            ["does not build", "high (0) must be > low"],
        ),
        (
            ["env.kwargs.base_url=http://127.0.0.1:9"],
            ["base_url='http://127.0.0.1:9'", "does not answer", "start it"],
        ),
    ],
)
def test_bad_configurations_fail_at_start_up_naming_the_fix(overrides, words, tmp_path):
    assert_start_up_fails(["env=openenv", *overrides], words, tmp_path)


def documented_commands() -> dict[str, list[str]]:
    """docs/environments.md's OpenEnv training commands on the tiny model, in process and over a server."""
    from test_readme_commands import COMMANDS, overrides_of

    found = [
        c
        for doc, c in COMMANDS
        if doc == "environments.md" and "env=openenv" in c and "+experiment=tiny" in c
    ]
    return {("server" if "base_url" in c else "in process"): overrides_of(c) for c in found}


def test_the_docs_give_both_commands():
    from test_readme_commands import COMMANDS

    tiny = [
        c
        for doc, c in COMMANDS
        if doc == "environments.md" and "env=openenv" in c and "+experiment=tiny" in c
    ]
    assert len(tiny) == 2 and set(documented_commands()) == {"in process", "server"}


@pytest.mark.slow
def test_the_documented_command_trains_two_steps(tmp_path, ray_cluster):
    rows = api.run(
        [*documented_commands()["in process"], "trainer.steps=2", "logger.mode=disabled"],
        run_dir=str(tmp_path),
    )
    assert [r["step"] for r in rows] == [0, 1]
    assert all(r["batch/trajectories"] > 0 and r["episode/failed"] == 0 for r in rows), [
        r.get("episode/failure_reasons") for r in rows
    ]


@pytest.mark.slow
def test_the_documented_server_command_trains_two_steps(tmp_path, ray_cluster):
    proc, url = start_server()
    try:
        overrides = [
            f"env.kwargs.base_url={url}" if o.startswith("env.kwargs.base_url=") else o
            for o in documented_commands()["server"]
        ]
        rows = api.run([*overrides, "trainer.steps=2", "logger.mode=disabled"], run_dir=str(tmp_path))
    finally:
        stop(proc)
    assert [r["step"] for r in rows] == [0, 1]
    assert all(r["batch/trajectories"] > 0 and r["episode/failed"] == 0 for r in rows), [
        r.get("episode/failure_reasons") for r in rows
    ]
