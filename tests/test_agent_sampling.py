"""Black-box agents keep the sampling they train on: a request whose temperature, top_p or top_k the
trainer would not score under is refused with the key to change (pure, no server)."""

from __future__ import annotations

import pytest

from rollout.agent.protocol import RequestError, sampling_params
from slime.core.config import RolloutConfig

CFG = RolloutConfig(temperature=0.7, top_p=1.0, max_tokens_per_turn=32, max_total_tokens=256)


def test_the_rollout_sampling_is_the_default_and_accepted_when_repeated():
    for body in ({}, {"temperature": 0.7}, {"temperature": 0.7, "top_p": 1.0, "top_k": -1}):
        params = sampling_params(body, CFG, prompt_len=10)
        assert (params.temperature, params.top_p, params.top_k) == (0.7, 1.0, -1)


@pytest.mark.parametrize(
    ("body", "param", "fix"),
    [
        ({"temperature": 0.2}, "temperature", "rollout.temperature=0.2"),
        ({"temperature": 0.0}, "temperature", "rollout.temperature=0.0"),
        ({"top_p": 0.9}, "top_p", "rollout.top_p=0.9"),
        ({"top_k": 20}, "top_k", "omit top_k"),
    ],
)
def test_sampling_the_trainer_cannot_score_is_refused(body, param, fix):
    with pytest.raises(RequestError) as info:
        sampling_params(body, CFG, prompt_len=10)
    assert info.value.param == param
    assert fix in str(info.value)
