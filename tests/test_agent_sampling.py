"""Black-box agents keep the temperature they train on: a request at another temperature is refused
with the key to change; top_p and top_k are accepted (the engine records each token's sampling mask and
the trainer scores under the same truncation). Pure, no server."""

from __future__ import annotations

import pytest

from rollout.agent.protocol import RequestError, sampling_params
from slime.core.config import RolloutConfig

CFG = RolloutConfig(temperature=0.7, top_p=1.0, max_tokens_per_turn=32, max_total_tokens=256)


def test_the_rollout_sampling_is_the_default_and_accepted_when_repeated():
    for body in ({}, {"temperature": 0.7}, {"temperature": 0.7, "top_p": 1.0, "top_k": -1}):
        params = sampling_params(body, CFG, prompt_len=10)
        assert (params.temperature, params.top_p, params.top_k) == (0.7, 1.0, -1)
        assert not params.truncates


def test_top_p_and_top_k_are_the_agents_to_choose():
    params = sampling_params({"top_p": 0.9, "top_k": 20}, CFG, prompt_len=10)
    assert (params.top_p, params.top_k) == (0.9, 20) and params.truncates
    # The rollout's own truncation is the default.
    cfg = RolloutConfig(temperature=0.7, top_p=0.8, top_k=40, max_tokens_per_turn=32, max_total_tokens=256)
    params = sampling_params({}, cfg, prompt_len=10)
    assert (params.top_p, params.top_k) == (0.8, 40)


@pytest.mark.parametrize(
    ("body", "param", "fix"),
    [
        ({"temperature": 0.2}, "temperature", "rollout.temperature=0.2"),
        ({"temperature": 0.0}, "temperature", "rollout.temperature=0.0"),
        ({"top_k": -5}, "top_k", "-1, 0 (off) or positive"),
    ],
)
def test_sampling_the_trainer_cannot_score_is_refused(body, param, fix):
    with pytest.raises(RequestError) as info:
        sampling_params(body, CFG, prompt_len=10)
    assert info.value.param == param
    assert fix in str(info.value)
