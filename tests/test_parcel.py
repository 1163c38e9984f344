"""envs/parcel.py: task generation, the track tool, rewards on scripted episodes, no answer leak."""

from __future__ import annotations

import re

import pytest

from envs.base import Action, ToolCall, check_environment_class
from envs.parcel import (
    DEMO_LETTERS,
    DEMONSTRATIONS,
    TASK_LETTERS,
    ParcelEnv,
    demonstration_messages,
    extract_depot,
    question,
    track_output,
)
from envs.registry import load_env_class
from slime.core.types import Task

CODE = re.compile(r"\b[A-Z][1-9]\b")
ROUTE = ["B2", "K7", "D4", "M1", "H9"]  # 4 hops: 5 track calls to learn that H9 is the final stop


def track(*depots: str) -> Action:
    calls = [ToolCall(name="track", arguments={"depot": d}) for d in depots]
    return Action(content="<tool_call>...</tool_call>", tool_calls=calls)


def reply(text: str) -> Action:
    return Action(content=text)


def task_for(route: list[str] = ROUTE) -> Task:
    return Task(id="t", prompt=question(route[0]), env_args={"route": route, "answer": route[-1]})


# --------------------------------------------------------------------------------------- tasks
def test_registered_and_satisfies_the_contract():
    assert load_env_class("parcel") is ParcelEnv
    check_environment_class(ParcelEnv)


def test_make_tasks_is_deterministic_and_in_range():
    a = ParcelEnv.make_tasks(60, seed=3, min_hops=3, max_hops=5)
    again = ParcelEnv.make_tasks(60, seed=3, min_hops=3, max_hops=5)
    assert [(t.id, t.prompt, t.env_args) for t in a] == [(t.id, t.prompt, t.env_args) for t in again]
    assert [t.env_args for t in a] != [t.env_args for t in ParcelEnv.make_tasks(60, seed=4)]
    hops = set()
    for t in a:
        route = t.env_args["route"]
        hops.add(len(route) - 1)
        assert len(set(route)) == len(route)  # no cycles: every depot once
        assert all(len(c) == 2 and c[0] in TASK_LETTERS and c[1] in "123456789" for c in route)
        assert t.env_args["answer"] == route[-1]
        assert t.prompt == question(route[0]) == f"A parcel starts at depot {route[0]}. Where does it end up?"
    assert hops == {3, 4, 5}
    assert {len(t.env_args["route"]) for t in ParcelEnv.make_tasks(20, seed=0, min_hops=2, max_hops=2)} == {3}


def test_kwargs_are_validated():
    with pytest.raises(ValueError, match=r"env\.dataset\.kwargs.*min_hops"):
        ParcelEnv.make_tasks(2, 0, min_hops=0)
    with pytest.raises(ValueError, match=r"env\.dataset\.kwargs.*max_hops"):
        ParcelEnv.make_tasks(2, 0, min_hops=4, max_hops=3)
    with pytest.raises(ValueError, match=r"env\.kwargs\.max_turns"):
        ParcelEnv(max_turns=0)
    with pytest.raises(ValueError, match=r"env\.kwargs\.demonstrations"):
        ParcelEnv(demonstrations=len(DEMONSTRATIONS) + 1)


# ------------------------------------------------------------------------------------- the tool
@pytest.mark.parametrize("show_previous", [False, True])
async def test_track_returns_exactly_one_step_of_the_route(show_previous):
    env = ParcelEnv(show_previous=show_previous)
    await env.reset(task_for())
    for i, depot in enumerate(ROUTE):
        result = await env.step(track(depot))
        assert not result.done and result.reward == 0.0
        (msg,) = result.observation
        assert msg["role"] == "tool" and msg["content"] == track_output(ROUTE, i, show_previous)
        # Only what this call looked up: the depot, its successor and (show_previous) its predecessor.
        allowed = {depot, *ROUTE[i + 1 : i + 2]} | (set(ROUTE[max(0, i - 1) : i]) if show_previous else set())
        assert set(CODE.findall(msg["content"])) == allowed


def test_track_output_wording():
    assert track_output(ROUTE, 1) == "K7: the parcel goes on to D4."
    assert track_output(ROUTE, 4) == "H9: final stop."
    assert track_output(ROUTE, 0, True) == "B2: the parcel starts here and goes on to K7."
    assert track_output(ROUTE, 1, True) == "K7: the parcel came from B2 and goes on to D4."
    assert track_output(ROUTE, 4, True) == "H9: the parcel came from M1. This is the final stop."


async def test_track_errors_and_lenient_input():
    env = ParcelEnv()
    await env.reset(task_for())
    out = (await env.step(track(" k7 "))).observation[0]["content"]  # case and spaces forgiven
    assert out == "K7: the parcel goes on to D4."
    out = (await env.step(track("Z5"))).observation[0]["content"]
    assert out == "Z5: no record of this parcel at this depot."
    bad = Action(content="x", tool_calls=[ToolCall(name="track", arguments={"where": "B2"})])
    assert "needs a string argument 'depot'" in (await env.step(bad)).observation[0]["content"]
    other = Action(content="x", tool_calls=[ToolCall(name="calculator", arguments={"expression": "1"})])
    result = await env.step(other)
    assert "unknown tool 'calculator'" in result.observation[0]["content"]
    assert result.info["tool_ok"] == 1 and result.info["tool_errors"] == 3


async def test_several_calls_in_one_turn_each_get_a_message():
    env = ParcelEnv()
    await env.reset(task_for())
    result = await env.step(track("B2", "K7"))
    assert [m["content"] for m in result.observation] == [track_output(ROUTE, 0), track_output(ROUTE, 1)]


# ------------------------------------------------------------------------------------- rewards
@pytest.mark.parametrize("show_previous", [False, True])
async def test_following_the_whole_chain_earns_the_reward(show_previous):
    env = ParcelEnv(show_previous=show_previous)
    await env.reset(task_for())
    for depot in ROUTE:
        assert not (await env.step(track(depot))).done
    result = await env.step(reply("Answer: H9"))
    assert result.done and result.reward == 1.0
    assert result.info["correct"] and result.info["reached_final"] and result.info["tool_ok"] == 5


@pytest.mark.parametrize(
    ("calls", "answer", "reward"),
    [
        (ROUTE[:3], "Answer: D4", 0.0),  # stopped early: the last depot seen is not the final one
        (ROUTE[:4], "Answer: H9", 1.0),  # right, though H9 was never checked to be the final stop
        ([], "Answer: B2", 0.0),
        (ROUTE, "Answer: M1", 0.0),  # the depot it came from
        (ROUTE, "The parcel ends at h9.", 1.0),  # no "Answer:": the last depot code in the reply
        (ROUTE, "Answer: H9. It came from M1.", 1.0),  # "Answer:" wins over later codes
        (ROUTE, "I do not know.", 0.0),
    ],
)
async def test_reward_is_the_final_answers_correctness(calls, answer, reward):
    env = ParcelEnv(show_previous=True)
    await env.reset(task_for())
    for depot in calls:
        await env.step(track(depot))
    result = await env.step(reply(answer))
    assert result.done and result.reward == reward and result.info["correct"] == (reward == 1.0)
    assert result.info["answered"] == (reward == 1.0 or "Answer" in answer)


async def test_max_turns_ends_the_episode_unanswered():
    env = ParcelEnv(max_turns=3)
    await env.reset(task_for())
    assert not (await env.step(track("B2"))).done
    assert not (await env.step(track("K7"))).done
    result = await env.step(track("D4"))
    assert result.done and result.reward == 0.0 and result.info["answered"] is False


@pytest.mark.parametrize(
    ("text", "depot"),
    [
        ("Answer: K3", "K3"),
        ("answer: k3", "K3"),
        ("Answer: **K3**", "K3"),
        ("K3 then M4", "M4"),
        ("none", None),
    ],
)
def test_extract_depot(text, depot):
    assert extract_depot(text) == depot


# ---------------------------------------------------------------------------------------- leaks
@pytest.mark.parametrize("show_previous", [False, True])
async def test_prompt_names_only_the_start(show_previous):
    for task in ParcelEnv.make_tasks(30, seed=1):
        env = ParcelEnv(demonstrations=len(DEMONSTRATIONS), show_previous=show_previous)
        messages = await env.reset(task)
        text = " ".join(m["content"] for m in messages) + str(env.tools)
        assert {c for c in CODE.findall(text) if c[0] in TASK_LETTERS} == {task.env_args["route"][0]}


# ------------------------------------------------------------------------------ demonstrations
@pytest.mark.parametrize("show_previous", [False, True])
def test_demonstrations_are_consistent(show_previous, tokenizer):
    from rollout.chat import ChatFormat

    assert len({len(r) for r in DEMONSTRATIONS}) == len(DEMONSTRATIONS)  # different lengths
    for route in DEMONSTRATIONS:
        assert len(set(route)) == len(route) and all(c[0] in DEMO_LETTERS for c in route)
    msgs = demonstration_messages(len(DEMONSTRATIONS), show_previous)
    i = 0
    for route in DEMONSTRATIONS:
        assert msgs[i] == {"role": "user", "content": question(route[0])}
        i += 1
        for j, depot in enumerate(route):
            assert msgs[i]["tool_calls"][0]["function"] == {"name": "track", "arguments": {"depot": depot}}
            assert msgs[i + 1]["role"] == "tool"
            assert msgs[i + 1]["content"] == track_output(route, j, show_previous)
            i += 2
        assert msgs[i] == {"role": "assistant", "content": f"Answer: {route[-1]}"}
        i += 1
    assert i == len(msgs)
    # Rendered for SmolLM2: the example calls in the model's own call syntax.
    text = ChatFormat(tokenizer).prompt_text(msgs + [{"role": "user", "content": "q"}], ParcelEnv.tools)
    assert '<tool_call>[{"name": "track", "arguments": {"depot": "W2"}}]</tool_call>' in text


async def test_reset_layout():
    task = task_for()
    msgs = await ParcelEnv(demonstrations=2, show_previous=True).reset(task)
    assert msgs[0]["role"] == "system" and msgs[-1] == {"role": "user", "content": task.prompt}
    assert msgs[1:-1] == demonstration_messages(2, show_previous=True)
    assert [m["role"] for m in await ParcelEnv().reset(task)] == ["system", "user"]
    assert [m["role"] for m in await ParcelEnv(system_prompt="").reset(task)] == ["user"]
    with pytest.raises(ValueError, match="route"):
        await ParcelEnv().reset(Task(id="x", prompt="p", env_args={"answer": "B2"}))
