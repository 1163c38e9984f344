"""The importance-sampling piece (trainer/importance.py) against hand-computed values: every mode at
every level, the two factors of off_policy=factored, M2PO's trust region, the effective sample size and
its step control, the per-staleness statistics and the fallback's measured gap."""

from __future__ import annotations

import math

import pytest
import torch

from slime.core.config import AlgorithmConfig, IsFactorConfig
from trainer.importance import (
    behavior_train_logprobs,
    ess,
    ess_lr_scale,
    factor,
    fallback_gap,
    importance_weights,
    m2_keep,
    offpolicy_stats,
)
from trainer.losses import policy_loss

LN = math.log
# Two sequences: three loss tokens with ratios 2, 1/2, 4; two with 3, 1/3 (and padding).
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
X = torch.tensor([[LN(2), LN(0.5), LN(4)], [LN(3), LN(1 / 3), 99.0]])  # 99: padding, never read


def _f(level: str, mode: str, low: float = 0.0, high: float = 2.0, tau: float = 0.04):
    return factor(X, MASK, IsFactorConfig(level=level, mode=mode, low=low, high=high), tau)  # type: ignore[arg-type]


def _close(t: torch.Tensor, expected: list, atol: float = 1e-5) -> None:
    torch.testing.assert_close(t.float(), torch.tensor(expected, dtype=torch.float32), atol=atol, rtol=0)


def _keep(t: torch.Tensor) -> list[list[bool]]:
    return t.tolist()


# ------------------------------------------------------------------------------------ token level
def test_token_level_modes_by_hand():
    f = _f("token", "none")
    _close(f.weight, [[1, 1, 1], [1, 1, 1]])
    assert _keep(f.keep) == [[True, True, True], [True, True, False]]
    _close(_f("token", "weight").weight[MASK.bool()], [2, 0.5, 4, 3, 1 / 3])
    f = _f("token", "truncate", high=2.0)
    _close(f.weight[MASK.bool()], [2, 0.5, 2, 2, 1 / 3])
    assert f.changed_tokens(MASK).tolist() == [[False, False, True], [True, False, False]]
    f = _f("token", "clip", low=0.6, high=2.0)
    _close(f.weight[MASK.bool()], [2, 0.6, 2, 2, 0.6])
    assert f.changed_tokens(MASK).tolist() == [[False, True, True], [True, True, False]]
    # mask: weight w inside [0.6, 2] (inclusive), dropped outside; reject: weight 1 inside.
    f = _f("token", "mask", low=0.6, high=2.0)
    assert _keep(f.keep) == [[True, False, False], [False, False, False]]
    assert float(f.weight[0, 0]) == pytest.approx(2.0)
    f = _f("token", "reject", low=0.6, high=2.0)
    assert _keep(f.keep) == [[True, False, False], [False, False, False]]
    assert float(f.weight[0, 0]) == 1.0


def test_m2_trust_region_by_hand():
    # x^2 = ln2^2 (0.480), ln2^2, ln4^2 (1.922), ln3^2 (1.207), ln3^2: mean 1.059. With tau = 0.5 the
    # largest go one by one: 1.922 (mean of the rest 0.844), 1.207 (0.723), 1.207 (0.480 <= 0.5).
    f = _f("token", "m2", tau=0.5)
    assert _keep(f.keep) == [[True, True, False], [False, False, False]]
    _close(f.weight[0, :2], [2, 0.5])  # the kept keep their untruncated weight
    # A loose bound drops nothing; a tight one keeps the single smallest.
    assert _keep(_f("token", "m2", tau=2.0).keep) == [[True, True, True], [True, True, False]]
    valid = torch.tensor([True, True, True])
    assert m2_keep(torch.tensor([3.0, -1.0, 2.0]), valid, 1e-9).tolist() == [False, True, False]
    assert m2_keep(torch.tensor([0.0]), torch.tensor([False]), 0.1).tolist() == [False]


# -------------------------------------------------------------------------------- sequence levels
def test_sequence_and_geometric_mean_levels_by_hand():
    # sequence: the product of the token ratios, 2 * 0.5 * 4 = 4 and 3 * 1/3 = 1.
    f = _f("sequence", "weight")
    _close(f.unit_ratio, [4, 1])
    _close(f.weight[MASK.bool()], [4, 4, 4, 1, 1])
    f = _f("sequence", "truncate", high=2.0)
    _close(f.weight[MASK.bool()], [2, 2, 2, 1, 1])
    assert f.changed.tolist() == [True, False]
    assert _keep(_f("sequence", "mask", low=0.5, high=2.0).keep) == [
        [False, False, False],
        [True, True, False],
    ]
    # geomean: 4 ** (1/3) = 1.587 and 1.
    f = _f("geomean", "weight")
    _close(f.unit_ratio, [4 ** (1 / 3), 1])
    f = _f("geomean", "mask", low=0.5, high=1.5)
    assert _keep(f.keep) == [[False, False, False], [True, True, False]]
    _close(f.weight[1, :2], [1, 1])
    f = _f("geomean", "reject", low=0.5, high=1.6)
    assert _keep(f.keep) == [[True, True, True], [True, True, False]]
    _close(f.weight[MASK.bool()], [1, 1, 1, 1, 1])
    f = _f("geomean", "clip", low=0.9, high=1.5)
    _close(f.weight[MASK.bool()], [1.5, 1.5, 1.5, 1, 1])
    # m2 per sequence: X^2 = (ln 4)^2 = 1.922 and 0, mean 0.961: tau 1 keeps both, tau 0.5 drops the
    # first sequence.
    assert _keep(_f("sequence", "m2", tau=1.0).keep) == [[True, True, True], [True, True, False]]
    assert _keep(_f("sequence", "m2", tau=0.5).keep) == [[False, False, False], [True, True, False]]
    with pytest.raises(ValueError, match="unknown importance-sampling level 'word'"):
        _f("word", "weight")


# ------------------------------------------------------------------------------------ two factors
def _factored(**kw: object) -> AlgorithmConfig:
    return AlgorithmConfig(name="grpo", off_policy="factored", **kw)  # type: ignore[arg-type]


def test_the_two_factors_by_hand():
    mask = torch.tensor([[1.0, 1.0]])
    mu = torch.log(torch.tensor([[0.2, 0.5]]))
    pi_v = torch.log(torch.tensor([[0.1, 0.5]]))  # discrepancy d = pi_v / mu = 0.5, 1
    prox = torch.log(torch.tensor([[0.3, 0.1]]))  # staleness s = pi_prox / pi_v = 3, 0.2
    cfg = _factored(
        discrepancy=IsFactorConfig(mode="truncate", high=2.0),  # type: ignore[arg-type]
        staleness=IsFactorConfig(mode="truncate", high=2.0),  # type: ignore[arg-type]
    )
    w = importance_weights(prox, mu, pi_v, mask, cfg)
    _close(w.weight, [[0.5 * 2.0, 1.0 * 0.2]])  # d * min(s, 2)
    _close(w.rho_unit, [[1.5, 0.2]])  # the whole ratio pi_prox / mu, untouched
    assert w.changed.tolist() == [[True, False]]
    torch.testing.assert_close(w.anchor, prox)
    # A discrepancy mask drops the first token whatever the staleness does.
    cfg = _factored(
        discrepancy=IsFactorConfig(mode="reject", low=0.8, high=1.25),  # type: ignore[arg-type]
        staleness=IsFactorConfig(mode="weight"),  # type: ignore[arg-type]
    )
    w = importance_weights(prox, mu, pi_v, mask, cfg)
    assert w.keep.tolist() == [[False, True]]
    _close(w.weight, [[3.0, 0.2]])
    # Both factors untruncated: the decoupled weight pi_prox / mu, however it is split.
    both = _factored(discrepancy=IsFactorConfig(mode="weight"), staleness=IsFactorConfig(mode="weight"))  # type: ignore[arg-type]
    decoupled = AlgorithmConfig(name="grpo", off_policy="decoupled")  # type: ignore[arg-type]
    for split in (pi_v, mu, prox):
        torch.testing.assert_close(
            importance_weights(prox, mu, split, mask, both).weight,
            importance_weights(prox, mu, split, mask, decoupled).weight,
        )


def test_factored_policy_loss_by_hand():
    # One token, A = 1, pi_theta = pi_prox (policy ratio 1): l = -A * d * min(s, 2) = -(0.5 * 2).
    mask = torch.tensor([[1.0]])
    prox = torch.tensor([[LN(0.3)]])
    lp = prox.clone().requires_grad_(True)
    cfg = _factored()
    loss, metrics = policy_loss(
        lp, prox, torch.tensor([[LN(0.2)]]), torch.tensor([[1.0]]), mask, cfg, None, torch.tensor([[LN(0.1)]])
    )
    assert float(loss) == pytest.approx(-1.0)
    loss.backward()
    assert float(lp.grad) == pytest.approx(-1.0)
    assert float(metrics["is_weight/mean"]) == pytest.approx(1.0)
    assert float(metrics["is_ratio/mean"]) == pytest.approx(1.5)
    assert float(metrics["is_truncated_frac"]) == 1.0
    # Without pi_v every token counts as fresh: the whole ratio is the discrepancy (1.5 -> not truncated).
    loss, _ = policy_loss(lp, prox, torch.tensor([[LN(0.2)]]), torch.tensor([[1.0]]), mask, cfg)
    assert float(loss) == pytest.approx(-1.5)


def test_pi_v_per_token():
    prox = torch.tensor([[1.0, 2.0, 3.0]])
    mu = torch.tensor([[10.0, 20.0, 30.0]])
    snap = torch.tensor([[100.0, 200.0, 300.0]])
    fresh = torch.tensor([[True, False, False]])
    known = torch.tensor([[True, True, False]])
    assert behavior_train_logprobs(prox, mu, snap, known, fresh).tolist() == [[1.0, 200.0, 30.0]]
    assert behavior_train_logprobs(prox, mu, None, None, fresh).tolist() == [[1.0, 20.0, 30.0]]


# ------------------------------------------------------------------------------- ESS and metrics
def test_effective_sample_size_and_step_control():
    # w = 1, 1, 2, 0: mean 1, mean square 1.5 -> (sum w)^2 / (n sum w^2) = 16 / (4 * 6) = 2/3.
    assert ess(1.0, 1.5) == pytest.approx(2 / 3)
    assert ess(0.25, 0.25) == pytest.approx(0.25)  # one of four carries all: 1/n
    assert ess(0.0, 0.0) == 1.0  # nothing weighted: no evidence of degeneracy
    assert ess_lr_scale(0.25, 0.5, 0.0) == pytest.approx(0.5)
    assert ess_lr_scale(0.25, 1.0, 0.4) == pytest.approx(0.4)
    assert ess_lr_scale(0.01, 0.0, 0.0) == 1.0


def test_offpolicy_statistics_by_hand():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    mu = torch.zeros(1, 4)
    prox = torch.tensor([[0.0, LN(2), LN(4), 7.0]])  # ratios 1, 2, 4 (and padding)
    cfg = AlgorithmConfig(name="grpo", off_policy="tis", tis_cap=2.0)  # type: ignore[arg-type]
    w = importance_weights(prox, mu, prox, mask, cfg)
    stale = torch.tensor([[0, 1, 3, 0]])
    got = offpolicy_stats(prox, mu, prox, w, mask, stale)
    assert got["offpolicy/w_mean"] == pytest.approx(((1 + 2 + 2) / 3, 3.0))
    assert got["offpolicy/w_sq_mean"][0] == pytest.approx((1 + 4 + 4) / 3)
    assert got["offpolicy/raw_w_sq_mean"][0] == pytest.approx((1 + 4 + 16) / 3)
    assert got["offpolicy/log_ratio_m2"][0] == pytest.approx((LN(2) ** 2 + LN(4) ** 2) / 3)
    assert got["offpolicy/discrepancy_abs"][0] == pytest.approx((0 + LN(2) + LN(4)) / 3)
    assert got["offpolicy/staleness_abs"][0] == 0.0
    assert got["offpolicy/stale_0/frac"] == pytest.approx((1 / 3, 3.0))
    assert got["offpolicy/stale_1/is_ratio_mean"] == pytest.approx((2.0, 1.0))
    assert got["offpolicy/stale_3-4/is_weight_mean"] == pytest.approx((2.0, 1.0))  # truncated 4 -> 2
    assert got["offpolicy/stale_3-4/log_ratio_m2"][0] == pytest.approx(LN(4) ** 2)
    assert got["offpolicy/stale_9+/frac"] == (0.0, 3.0)
    # ESS of the applied weights 1, 2, 2: 25 / (3 * 9).
    assert ess(got["offpolicy/w_mean"][0], got["offpolicy/w_sq_mean"][0]) == pytest.approx(25 / 27)


def test_fallback_gap_by_hand():
    # Two stale tokens with exact pi_v: discrepancies 0.5 and 1. The fallback (pi_v := mu) would put
    # all of pi_prox / mu into staleness.
    mask = torch.tensor([[True, True]])
    mu = torch.log(torch.tensor([[0.2, 0.5]]))
    pi_v = torch.log(torch.tensor([[0.1, 0.5]]))
    prox = torch.log(torch.tensor([[0.3, 0.5]]))
    cfg = _factored()  # truncate both at 2: exact 0.5 * min(3, 2) = 1, fallback 1 * min(1.5, 2) = 1.5
    got = fallback_gap(prox, mu, pi_v, mask, cfg)
    assert got["offpolicy/fallback/discrepancy_abs"] == pytest.approx((LN(2) / 2, 2.0))
    assert got["offpolicy/fallback/logw_gap"] == pytest.approx((LN(1.5) / 2, 2.0))
    assert got["offpolicy/fallback/keep_diff"] == (0.0, 2.0)
