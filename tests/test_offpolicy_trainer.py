"""The off-policy pieces inside the real trainer step (in-process DeepSpeed, tiny_dense, float32):
behaviour-version snapshots give the exact trainer-side logprob of stale tokens and put the weights
back; the factored correction then equals its fallback exactly when the engine's logprobs are the
trainer's; the ESS step control scales the learning rate by the measured ESS."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import algo_cfg, make_groups, new_worker, token_logprobs, trainer_cfg

from slime.core.config import IsFactorConfig
from slime.core.types import Group


@pytest.fixture(scope="module", autouse=True)
def _process_group(in_process_trainer) -> None:
    """In-process workers share one process group, released after the module (tests/conftest.py)."""


@pytest.fixture(scope="module")
def initial(tiny_dense_dir):
    from tests.test_engine import load_hf

    return load_hf(tiny_dense_dir)


def stale_groups(tokenizer, model, offset: float) -> list[Group]:
    """Groups whose tokens were sampled at version 0 with behaviour logprobs = the version-0 model's
    own plus `offset` (an engine whose kernels disagree by exactly that); the last trajectory of each
    group has its second half at version 1 (an episode that outlived a weight push)."""
    groups = make_groups(tokenizer, seed=1)
    out = []
    for g in groups:
        trajs = []
        for i, t in enumerate(g.trajectories):
            lp = token_logprobs(model, t.token_ids, t.prompt_len)
            behavior = [0.0] * t.prompt_len + [x + offset for x in lp]
            versions = list(t.versions)
            if i == len(g.trajectories) - 1:
                half = t.prompt_len + (len(t.token_ids) - t.prompt_len) // 2
                versions = versions[:half] + [1] * (len(versions) - half)
            trajs.append(dataclasses.replace(t, behavior_logprobs=behavior, versions=versions))
        out.append(dataclasses.replace(g, trajectories=trajs))
    return out


def two_steps(tiny_dense_dir, tokenizer, second: list[Group], **algo) -> tuple[dict, dict[str, torch.Tensor]]:
    acfg = algo_cfg(off_policy="factored", loss_agg="token_mean", **algo)
    w = new_worker(tiny_dense_dir, trainer_cfg(lr=1e-2), acfg)
    try:
        w.train_step(make_groups(tokenizer, seed=0), version=0)
        metrics = w.train_step(second, version=1)
        state = {k: v.clone() for k, v in w.full_named_tensors(torch.float32)}
        return metrics, state
    finally:
        w.close()


def test_snapshots_score_stale_tokens_at_their_own_version(tiny_dense_dir, tokenizer, initial):
    # The engine's logprobs are the version-0 model's own: the exact pi_v equals mu, the fallback's.
    exact, exact_state = two_steps(
        tiny_dense_dir, tokenizer, stale_groups(tokenizer, initial, 0.0), behavior_snapshots=2
    )
    assert exact["offpolicy/exact_frac"] == 1.0
    assert exact["offpolicy/fallback/discrepancy_abs"] < 1e-5  # trainer vs transformers, same weights
    assert exact["offpolicy/fallback/logw_gap"] < 1e-5
    assert 0.5 < exact["offpolicy/stale_1/frac"] < 1.0 and exact["offpolicy/stale_0/frac"] > 0.0
    # ... so without snapshots (pi_v := mu) the update is the same: the snapshot forward put the
    # trained weights back untouched.
    fallback, fallback_state = two_steps(tiny_dense_dir, tokenizer, stale_groups(tokenizer, initial, 0.0))
    assert "offpolicy/exact_frac" not in fallback
    for name, value in exact_state.items():
        # Adam turns the 1e-6 difference of pi_v and mu into up to 1.2e-5 on small-gradient embedding rows;
        # a step moves weights by ~lr = 1e-2.
        torch.testing.assert_close(value, fallback_state[name], atol=5e-5, rtol=0, msg=name)
    # An engine off by 0.3 nats on every token: the snapshots measure exactly that discrepancy, which
    # the fallback would count as staleness. Truncating both factors at 2 hardly tells them apart (the
    # product is the same until a factor hits the cap); a tight band on the discrepancy does: the
    # exact split drops every stale token (d = exp(-0.3) = 0.74), the fallback (d = 1) keeps them all.
    band = IsFactorConfig(mode="reject", low=0.9, high=1.1)  # type: ignore[arg-type]
    shifted, _ = two_steps(
        tiny_dense_dir,
        tokenizer,
        stale_groups(tokenizer, initial, 0.3),
        behavior_snapshots=2,
        discrepancy=band,
    )
    assert shifted["offpolicy/fallback/discrepancy_abs"] == pytest.approx(0.3, abs=1e-4)
    assert shifted["offpolicy/fallback/keep_diff"] == 1.0
    assert shifted["masked_frac"] >= shifted["offpolicy/stale_1/frac"]


def test_ess_step_control_scales_the_learning_rate(tiny_dense_dir, tokenizer):
    # make_groups' behaviour logprobs are not the model's: the importance weights vary.
    acfg = algo_cfg(off_policy="decoupled", loss_agg="token_mean", ess_lr_power=1.0)
    w = new_worker(tiny_dense_dir, trainer_cfg(lr=1e-2), acfg)
    try:
        metrics = w.train_step(make_groups(tokenizer, seed=0), version=0)
        assert 0.0 < metrics["offpolicy/ess"] < 0.9
        assert metrics["offpolicy/lr_scale"] == pytest.approx(metrics["offpolicy/ess"], rel=1e-5)
        assert metrics["offpolicy/ess_raw"] == pytest.approx(
            metrics["offpolicy/ess"], rel=1e-5
        )  # untruncated
        assert {g["lr"] for g in w.policy.optimizer.param_groups} == {1e-2}  # restored after the step
    finally:
        w.close()
