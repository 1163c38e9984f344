"""The rollout-side metrics of a training batch (slime/metrics.py `batch_metrics`), by hand."""

from __future__ import annotations

from conftest import make_group, make_trajectory

from slime.core.types import Status
from slime.metrics import batch_metrics, render_turns, sample_rows


def test_partial_episodes_and_token_staleness() -> None:
    # Trained at version 3. Episode A ran through two pushes: tokens at versions 1, 2, 3, and the
    # buffer masked the version-1 token (stale_tokens=mask, bound 1). Episode B: one version.
    a = make_trajectory([1, 2], [3, 4, 5], reward=1.0, version=1)
    a.versions[2:] = [1, 2, 3]
    a.loss_mask[2] = 0
    b = make_trajectory([1, 2], [6, 7], reward=0.0, version=3)
    m = batch_metrics([make_group([a, b])], version=3)
    assert m["rollout/partial_episodes"] == 1.0
    assert m["staleness/token_max"] == 2.0  # the masked version-1 token, however old
    assert m["staleness/max"] == 1.0  # of the tokens the loss uses: versions 2, 3, 3, 3
    assert m["staleness/mean"] == 0.25  # (1 + 0 + 0 + 0) / 4


def test_episode_figures_count_a_split_episode_once() -> None:
    # Episode A: two segments (context limit), reward 1, 5 tool calls (1 malformed, 2 failed in the
    # env), longest context 900, 3 + 2 tokens generated. Episode B: reward 0, 1 call, context 300,
    # truncated, 4 tokens.
    a0 = make_trajectory([1, 2], [3, 4, 5], reward=1.0)
    a1 = make_trajectory([1, 2, 3, 4, 5], [6, 7], reward=1.0)
    info_a = {"tool_calls": 5, "malformed_tool_calls": 1, "env": {"tool_errors": 2}, "context_tokens": 900}
    for i, t in enumerate((a0, a1)):
        t.episode_id, t.segment, t.info, t.turns = "A", i, info_a, 6
    b = make_trajectory([1, 2], [3, 4, 5, 6], reward=0.0, status=Status.TRUNCATED)
    b.info, b.turns = {"tool_calls": 1, "context_tokens": 300}, 2
    m = batch_metrics([make_group([a0, a1, b])], version=0)
    assert m["batch/episodes"] == 2.0 and m["batch/trajectories"] == 3.0
    assert m["reward/mean"] == 0.5  # (1 + 0) / 2, not (1 + 1 + 0) / 3
    assert m["response/len_mean"] == 4.5  # (3 + 2 + 4) / 2
    assert m["episode/turns_mean"] == 4.0
    assert m["episode/tool_calls_mean"] == 3.0 and m["episode/tool_calls_max"] == 5.0
    assert m["episode/tool_calls_p50"] == 1.0 and m["episode/tool_calls_p90"] == 5.0
    assert m["episode/tool_errors_mean"] == 1.5  # (1 + 2 + 0) / 2
    assert m["episode/context_tokens_mean"] == 600.0 and m["episode/context_tokens_max"] == 900.0
    assert m["episode/segments_mean"] == 1.5
    assert m["episode/truncated_frac"] == 0.5


def test_samples_show_each_turn_with_the_version_that_generated_it() -> None:
    # prompt [1, 2] | turn 1 at v3: [3, 4] | env delta [9] | turn 2 started at v3, a push made it v4: [5, 6]
    t = make_trajectory([1, 2], [3, 4, 9, 5, 6], reward=1.0, version=3)
    t.loss_mask[4] = 0
    t.versions[4] = -1  # the env's delta
    t.versions[6] = 4
    rendered = render_turns(t, lambda ids: "".join(f"<{i}>" for i in ids))
    assert rendered == "[v3] <3><4><9>[v3->v4] <5><6>"
    (row,) = sample_rows(7, [make_group([t])], lambda ids: "".join(f"<{i}>" for i in ids))
    assert row["prompt"] == "<1><2>" and row["response"] == rendered
    assert (row["turns"], row["segments"], row["tool_calls"]) == (0, 1, 0)
