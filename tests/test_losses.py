"""Losses, KL, entropy and logprob helpers against hand-computed values (trainer/losses.py)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import trainer.losses as losses
from slime.core.config import AlgorithmConfig
from trainer.losses import (
    aggregate,
    entropy_from_logits,
    kl_estimate,
    policy_loss,
    token_logprobs_and_entropy,
    token_logprobs_from_logits,
    value_loss,
)

NAN, INF = float("nan"), float("inf")
LN2, LN3 = math.log(2.0), math.log(3.0)


def _cfg(**kw: object) -> AlgorithmConfig:
    return AlgorithmConfig(name="grpo", **kw)  # type: ignore[arg-type]


def _close(actual: torch.Tensor, expected: float | list, atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual.detach(), torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


def _log(xs: list[float]) -> torch.Tensor:
    return torch.tensor([math.log(x) for x in xs])


def _run(
    lp: torch.Tensor,
    prox: torch.Tensor,
    behav: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    cfg: AlgorithmConfig,
    loss_norm: float | None = None,
):
    """policy_loss on a fresh leaf; returns (loss, metrics, grad w.r.t. logprobs)."""
    leaf = lp.clone().requires_grad_(True)
    loss, metrics = policy_loss(leaf, prox, behav, adv, mask, cfg, loss_norm)
    loss.backward()
    return loss, metrics, leaf.grad


# ------------------------------------------------------------------------------------------ aggregate

AGG_X = torch.tensor([[1.0, 2.0, 3.0, NAN], [4.0, INF, -INF, NAN], [NAN, NAN, NAN, NAN]])
AGG_MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])


@pytest.mark.parametrize(
    ("mode", "loss_norm", "expected", "grad_row0", "grad_row1"),
    [
        ("token_mean", None, 10 / 4, 1 / 4, 1 / 4),  # (1 + 2 + 3 + 4) / 4 tokens
        ("seq_mean", None, (2 + 4) / 2, 1 / 6, 1 / 2),  # mean of per-sequence means 2 and 4; row 2 empty
        ("seq_sum_norm", None, 10 / (2 * 4), 1 / 8, 1 / 8),  # 2 non-empty sequences x T = 4
        ("seq_sum_norm", 5.0, 10 / (2 * 5), 1 / 10, 1 / 10),
    ],
)
def test_aggregate_modes_ignore_padding(mode, loss_norm, expected, grad_row0, grad_row1) -> None:
    x = AGG_X.clone().requires_grad_(True)
    out = aggregate(x, AGG_MASK, mode, loss_norm)
    _close(out, expected)
    out.backward()
    g = x.grad
    assert torch.isfinite(g).all()
    _close(g[0], [grad_row0] * 3 + [0.0])
    _close(g[1], [grad_row1, 0.0, 0.0, 0.0])
    _close(g[2], [0.0] * 4)


def test_aggregate_empty_and_unknown() -> None:
    for mode in ("token_mean", "seq_mean", "seq_sum_norm"):
        _close(aggregate(torch.ones(2, 3), torch.zeros(2, 3), mode), 0.0)
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(torch.ones(1, 1), torch.ones(1, 1), "sum")


# ------------------------------------------------------------------------------------------ PPO clip


def test_clip_fraction_and_ratio_stats() -> None:
    # Ratios 0.5, 0.9, 1.3, 1.1 (+ padding), advantages -1, 1, 1, -1, clip range [0.8, 1.28]:
    #   t0: max(0.5, 0.8) = 0.8        clipped low     t1: max(-0.9, -0.9) = -0.9   not clipped
    #   t2: max(-1.3, -1.28) = -1.28   clipped high    t3: max(1.1, 1.1) = 1.1      not clipped
    # token_mean = (0.8 - 0.9 - 1.28 + 1.1) / 4 = -0.07; grad -A r / 4 on unclipped tokens only.
    prox = torch.tensor([[-1.0, -2.0, -0.5, -1.5, 0.0]])
    lp = prox + torch.cat([_log([0.5, 0.9, 1.3, 1.1]), torch.tensor([7.0])])[None]
    adv = torch.tensor([[-1.0, 1.0, 1.0, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    cfg = _cfg(clip_low=0.2, clip_high=0.28, off_policy="tis")
    loss, m, grad = _run(lp, prox, prox, adv, mask, cfg)
    _close(loss, -0.07)
    _close(grad, [[0.0, -0.225, 0.0, 0.275, 0.0]])
    _close(m["clip_frac"], 0.5)
    _close(m["clip_frac/low"], 0.25)
    _close(m["clip_frac/high"], 0.25)
    _close(m["policy_ratio/mean"], 0.95)
    _close(m["policy_ratio/max"], 1.3)
    _close(m["policy_ratio/min"], 0.5)
    # k3: mean of r - 1 - ln r = (0.193147 + 0.005361 + 0.037636 + 0.004690) / 4
    _close(m["approx_kl"], 0.0602083)
    _close(m["is_ratio/mean"], 1.0)
    _close(m["mismatch/logprob_abs"], 0.0)


def test_symmetric_clip_would_not_clip_below_clip_high() -> None:
    # Same token as t2 above with clip_high 0.4: 1.3 is inside [0.8, 1.4], so it is not clipped.
    lp, prox = _log([1.3])[None], torch.zeros(1, 1)
    loss, m, grad = _run(lp, prox, prox, torch.ones(1, 1), torch.ones(1, 1), _cfg(clip_high=0.4))
    _close(loss, -1.3)
    _close(grad, [[-1.3]])
    _close(m["clip_frac"], 0.0)


# ------------------------------------------------------------------------------------------ off-policy


def test_tis_truncation_token_level() -> None:
    # Behaviour ratios pi_prox / mu = 0.5, 1, 3, 2.5, cap 2 -> weights 0.5, 1, 2, 2; on the proximal policy.
    prox = torch.tensor([[-1.0, -1.0, -1.0, -1.0]])
    behav = prox - _log([0.5, 1.0, 3.0, 2.5])[None]
    ones = torch.ones(1, 4)
    loss, m, grad = _run(prox, prox, behav, ones, ones, _cfg(off_policy="tis", tis_cap=2.0))
    _close(loss, -(0.5 + 1 + 2 + 2) / 4)
    _close(grad, [[-0.125, -0.25, -0.5, -0.5]])
    _close(m["is_ratio/mean"], 1.75)
    _close(m["is_ratio/max"], 3.0)
    _close(m["is_ratio/min"], 0.5)
    _close(m["is_truncated_frac"], 0.5)
    _close(m["is_weight/mean"], 1.375)
    _close(m["masked_frac"], 0.0)
    _close(m["mismatch/logprob_abs"], (LN2 + 0 + LN3 + math.log(2.5)) / 4)


def test_tis_sequence_level_uses_product() -> None:
    # Row 0: token ratios 2 and 0.5 (+ padding) -> product 1, weight 1.
    # Row 1: 2, 2, 1 -> product 4, truncated to 2. token_mean = (-1 - 1 - 2 - 2 - 2) / 5.
    prox = torch.zeros(2, 3)
    behav = -torch.stack([_log([2.0, 0.5, 1.0]), _log([2.0, 2.0, 1.0])])
    behav[0, 2] = -INF  # padding garbage
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    cfg = _cfg(off_policy="tis", off_policy_level="sequence", tis_cap=2.0)
    loss, m, grad = _run(prox, prox, behav, torch.ones(2, 3), mask, cfg)
    _close(loss, -1.6)
    _close(grad, [[-0.2, -0.2, 0.0], [-0.4, -0.4, -0.4]])
    _close(m["is_ratio/mean"], 2.5)  # over sequences: (1 + 4) / 2
    _close(m["is_ratio/max"], 4.0)
    _close(m["is_truncated_frac"], 0.5)


def test_mask_mode_token_level() -> None:
    # Ratios 0.4, 1.0, 1.9, 2.1 with band [0.5, 2]: first and last dropped, still counted in the mean.
    prox = torch.zeros(1, 4)
    behav = -_log([0.4, 1.0, 1.9, 2.1])[None]
    ones = torch.ones(1, 4)
    cfg = _cfg(off_policy="mask", mask_low=0.5, mask_high=2.0)
    loss, m, grad = _run(prox, prox, behav, ones, ones, cfg)
    _close(loss, -0.5)
    _close(grad, [[0.0, -0.25, -0.25, 0.0]])
    _close(m["masked_frac"], 0.5)
    _close(m["is_weight/mean"], 1.0)
    _close(m["is_ratio/max"], 2.1)


def test_mask_mode_sequence_level() -> None:
    # Row 0: 1.5 * 1.5 = 2.25 -> whole sequence dropped. Row 1: 0.8 * 1.2 * 1.0 = 0.96 -> kept.
    prox = torch.zeros(2, 3)
    behav = -torch.stack([_log([1.5, 1.5, 1.0]), _log([0.8, 1.2, 1.0])])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    cfg = _cfg(off_policy="mask", off_policy_level="sequence", mask_low=0.5, mask_high=2.0)
    loss, m, grad = _run(prox, prox, behav, torch.ones(2, 3), mask, cfg)
    _close(loss, -3 / 5)
    _close(grad, [[0.0, 0.0, 0.0], [-0.2, -0.2, -0.2]])
    _close(m["masked_frac"], 2 / 5)  # fraction of loss tokens
    _close(m["is_ratio/max"], 2.25)
    _close(m["is_ratio/min"], 0.96)


def test_decoupled_objective() -> None:
    # rho = pi_prox / mu = 0.5, 3; r = pi_theta / pi_prox = 1.3, 1.0; A = 1; clip 0.2:
    #   t0: 0.5 * max(-1.3, -1.2) = -0.6 (clipped), t1: 3 * -1 = -3 (weight not truncated).
    prox = torch.zeros(1, 2)
    behav = -_log([0.5, 3.0])[None]
    lp = _log([1.3, 1.0])[None]
    ones = torch.ones(1, 2)
    loss, m, grad = _run(lp, prox, behav, ones, ones, _cfg(off_policy="decoupled"))
    _close(loss, -1.8)
    _close(grad, [[0.0, -1.5]])
    _close(m["is_weight/mean"], 1.75)
    _close(m["clip_frac"], 0.5)
    # With a cap of 2.5 the rho = 3 token is dropped (AReaL's behav_imp_weight_cap), not truncated.
    loss, m, grad = _run(lp, prox, behav, ones, ones, _cfg(off_policy="decoupled", decoupled_cap=2.5))
    _close(loss, -0.3)
    _close(grad, [[0.0, 0.0]])
    _close(m["masked_frac"], 0.5)
    # TIS on the same data truncates instead: (-0.6 - 2) / 2.
    loss, _, _ = _run(lp, prox, behav, ones, ones, _cfg(off_policy="tis", tis_cap=2.0))
    _close(loss, -1.3)


def test_none_clips_against_behaviour() -> None:
    # Ratios against mu are 1.5 (clipped to 1.2) and 1.1; proximal values play no part.
    behav = torch.tensor([[-1.0, -2.0]])
    lp = behav + _log([1.5, 1.1])[None]
    ones = torch.ones(1, 2)
    cfg = _cfg(off_policy="none")
    loss_a, m, grad = _run(lp, torch.tensor([[5.0, -7.0]]), behav, ones, ones, cfg)
    loss_b, _, _ = _run(lp, torch.tensor([[0.0, 3.0]]), behav, ones, ones, cfg)
    _close(loss_a, -1.15)
    _close(loss_b, -1.15)
    _close(grad, [[0.0, -0.55]])
    _close(m["clip_frac"], 0.5)


# ------------------------------------------------------------------------------------------ GSPO


def test_gspo_sequence_ratio_and_clip() -> None:
    # Row 0: log-ratios 0.1, 0.3 (+ padding) -> s = exp(0.2) = 1.2214028, inside [0.7, 1.3].
    # Row 1: 0.5 x3 -> s = exp(0.5) = 1.6487213 > 1.3 -> the whole sequence is clipped (no gradient).
    lp = torch.tensor([[0.1, 0.3, 0.0], [0.5, 0.5, 0.5]])
    lp[0, 2] = 9.0  # padding garbage
    prox = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv = torch.ones(2, 3)
    cfg = _cfg(ratio_level="sequence", clip_low=0.3, clip_high=0.3, loss_agg="seq_mean")
    loss, m, grad = _run(lp, prox, prox, adv, mask, cfg)
    # seq_mean = (-1.2214028 - 1.3) / 2; d/d lp_{0,t} = (1/2 seqs) * (1/2 tokens) * -s = -0.3053507
    _close(loss, -1.2607014)
    _close(grad, [[-0.3053507, -0.3053507, 0.0], [0.0, 0.0, 0.0]])
    _close(m["policy_ratio/mean"], 1.4350620)  # over sequences
    _close(m["policy_ratio/max"], 1.6487213)
    _close(m["clip_frac"], 3 / 5)  # tokens whose gradient the clip removed
    # token_mean: (-2 s - 3 * 1.3) / 5, gradient -s / 5 on row 0.
    loss, _, grad = _run(lp, prox, prox, adv, mask, _cfg(ratio_level="sequence", clip_low=0.3, clip_high=0.3))
    _close(loss, -1.2685611)
    _close(grad, [[-0.2442806, -0.2442806, 0.0], [0.0, 0.0, 0.0]])


# ------------------------------------------------------------------------------------------ on-policy

MIXED_MASK = torch.tensor(
    [
        [0.0, 1.0, 1.0, 0.0, 1.0, 1.0],  # prompt, turn 1, env token, turn 2
        [1.0, 1.0, 1.0, 1.0, 0.0, 0.0],  # padding at the end
        [0.0, 0.0, 1.0, 1.0, 1.0, 0.0],
    ]
)


@pytest.mark.parametrize(
    ("off_policy", "level", "ratio_level", "agg"),
    list(
        itertools.product(
            ("none", "tis", "mask", "decoupled"),
            ("token", "sequence"),
            ("token", "sequence"),
            ("token_mean", "seq_mean", "seq_sum_norm"),
        )
    ),
)
def test_on_policy_every_variant_is_plain_policy_gradient(off_policy, level, ratio_level, agg) -> None:
    gen = torch.Generator().manual_seed(0)
    base = -3.0 * torch.rand(3, 6, generator=gen)
    adv = torch.randn(3, 6, generator=gen)
    cfg = _cfg(
        off_policy=off_policy,
        off_policy_level=level,
        ratio_level=ratio_level,
        loss_agg=agg,
        clip_low=0.2,
        clip_high=0.28,
        decoupled_cap=1.5,
    )
    loss, m, grad = _run(base, base.clone(), base.clone(), adv, MIXED_MASK, cfg, loss_norm=8.0)
    ref_leaf = base.clone().requires_grad_(True)
    ref = aggregate(-adv * ref_leaf, MIXED_MASK, agg, loss_norm=8.0)
    ref.backward()
    torch.testing.assert_close(grad, ref_leaf.grad)
    # The value is the surrogate at ratio 1: aggregate(-A), not aggregate(-A * logprob).
    torch.testing.assert_close(loss, aggregate(-adv, MIXED_MASK, agg, loss_norm=8.0))
    for key in ("clip_frac", "masked_frac", "approx_kl", "is_truncated_frac", "mismatch/logprob_abs"):
        _close(m[key], 0.0)
    for key in ("policy_ratio/mean", "is_ratio/mean", "is_weight/mean"):
        _close(m[key], 1.0)


def test_plain_policy_gradient_reference_by_hand() -> None:
    # The reference of the test above, by hand: token_mean of -A * logprob has gradient -A / N.
    leaf = torch.zeros(1, 3, requires_grad=True)
    aggregate(
        -torch.tensor([[2.0, -1.0, 4.0]]) * leaf, torch.tensor([[1.0, 1.0, 0.0]]), "token_mean"
    ).backward()
    _close(leaf.grad, [[-1.0, 0.5, 0.0]])


@pytest.mark.parametrize(
    "cfg",
    [
        _cfg(off_policy="tis"),
        _cfg(off_policy="mask", off_policy_level="sequence", loss_agg="seq_mean"),
        _cfg(off_policy="decoupled", ratio_level="sequence", loss_agg="seq_sum_norm"),
        _cfg(off_policy="none", clip_high=0.28),
    ],
)
def test_padding_changes_nothing(cfg: AlgorithmConfig) -> None:
    gen = torch.Generator().manual_seed(1)
    prox = -3.0 * torch.rand(3, 6, generator=gen)
    behav = prox + 0.3 * torch.randn(3, 6, generator=gen)
    lp = prox + 0.3 * torch.randn(3, 6, generator=gen)
    adv = torch.randn(3, 6, generator=gen)
    pad = MIXED_MASK == 0
    garbage = [t.clone() for t in (lp, prox, behav, adv)]
    for t, value in zip(garbage, (NAN, INF, -INF, NAN), strict=True):
        t[pad] = value
    loss0, m0, g0 = _run(lp, prox, behav, adv, MIXED_MASK, cfg)
    loss1, m1, g1 = _run(*garbage, MIXED_MASK, cfg)
    torch.testing.assert_close(loss0, loss1)
    torch.testing.assert_close(g0, g1)
    assert (g1[pad] == 0).all()
    for key in m0:
        torch.testing.assert_close(m0[key], m1[key], msg=key)
        assert m1[key].dim() == 0 and not m1[key].requires_grad


# ------------------------------------------------------------------------------------------ KL


def test_kl_estimators() -> None:
    # d = ln 0.5 - ln 0.25 = ln 2: k1 = 0.693147, k2 = ln(2)^2 / 2 = 0.240227, k3 = 1/2 - 1 + ln 2 = 0.193147
    # d = -ln 2:                   k1 = -0.693147, k2 = 0.240227,            k3 = 2 - 1 - ln 2 = 0.306853
    lp = _log([0.5, 0.25, 0.3])
    ref = _log([0.25, 0.5, 0.3])
    _close(kl_estimate(lp, ref, "k1"), [0.6931472, -0.6931472, 0.0])
    _close(kl_estimate(lp, ref, "k2"), [0.2402265, 0.2402265, 0.0])
    _close(kl_estimate(lp, ref, "k3"), [0.1931472, 0.3068528, 0.0])
    # d k3 / d logprob = 1 - exp(-d) = 1 - 1/2 at d = ln 2.
    leaf = lp[:1].clone().requires_grad_(True)
    kl_estimate(leaf, ref[:1], "k3").sum().backward()
    _close(leaf.grad, [0.5])
    with pytest.raises(ValueError):
        kl_estimate(lp, ref, "k4")


# ------------------------------------------------------------------------------------------ value loss


def test_value_loss_clipping() -> None:
    # old 1.0, clip 0.2:
    #   t0: v 1.5 -> v_clip 1.2; R 2: max(0.25, 0.64) = 0.64 (clipped branch: no gradient)
    #   t1: v 0.5 -> v_clip 0.8; R 0: max(0.25, 0.64) = 0.64 (clipped branch: no gradient)
    #   t2: v 1.05 inside the clip; R 1: 0.0025, gradient 2 * 0.05 * 0.5 / 3
    #   loss = 0.5 * (0.64 + 0.64 + 0.0025) / 3 = 0.21375
    values = torch.tensor([[1.5, 0.5, 1.05, NAN]], requires_grad=True)
    old = torch.tensor([[1.0, 1.0, 1.0, INF]])
    returns = torch.tensor([[2.0, 0.0, 1.0, NAN]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss = value_loss(values, old, returns, mask, clip=0.2)
    _close(loss, 0.21375)
    loss.backward()
    _close(values.grad, [[0.0, 0.0, 0.0166667, 0.0]])
    # clip 0 switches clipping off: 0.5 * (0.25 + 0.25 + 0.0025) / 3
    _close(value_loss(values, old, returns, mask, clip=0.0), 0.08375)


# ------------------------------------------------------------------------------------------ logits


def test_entropy_hand_examples() -> None:
    logits = torch.tensor(
        [
            [0.0, 0.0, 0.0, 0.0],  # uniform over 4: ln 4
            [0.0, LN3, -INF, -INF],  # p = (1/4, 3/4): -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.5623351
            [1000.0, 1000.0, -1000.0, -INF],  # huge logits: ln 2, no overflow
        ]
    )
    leaf = logits.clone().requires_grad_(True)
    ent = entropy_from_logits(leaf)
    _close(ent, [1.3862944, 0.5623351, 0.6931472])
    ent.sum().backward()
    assert torch.isfinite(leaf.grad).all()
    # dH/dz_j = -p_j (z_j - E_p[z]); uniform rows have zero gradient.
    _close(leaf.grad[0], [0.0] * 4)
    # Row 1: E[z] = 3/4 ln 3; dH/dz_0 = -1/4 (0 - 3/4 ln 3) = 0.2059898, dH/dz_1 = -3/4 (ln 3 - 3/4 ln 3)
    _close(leaf.grad[1], [0.2059898, -0.2059898, 0.0, 0.0])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_entropy_matches_autograd_reference_with_chunking(
    monkeypatch: pytest.MonkeyPatch, temperature: float
) -> None:
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 10)  # V = 7 -> one row per chunk
    gen = torch.Generator().manual_seed(2)
    full = torch.randn(2, 4, 7, generator=gen, dtype=torch.float64) * 3
    logits = full[:, :-1]  # non-contiguous, as a caller's shifted slice
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    ent = entropy_from_logits(a, temperature)
    z = b / temperature
    ref = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
    torch.testing.assert_close(ent, ref)
    w = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    (ent * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(a.grad, b.grad)
    assert entropy_from_logits(full[0]).shape == (4,)


def test_token_logprobs_hand_examples() -> None:
    # logits (0, ln 3): p = (1/4, 3/4). At temperature 2: (0, ln 3 / 2), p_1 = sqrt3 / (1 + sqrt3).
    logits = torch.tensor([[[0.0, LN3], [0.0, LN3]]])
    targets = torch.tensor([[1, 0]])
    _close(token_logprobs_from_logits(logits, targets), [[-0.2876821, -1.3862944]])
    _close(token_logprobs_from_logits(logits[:, :1], targets[:, :1], temperature=2.0), [[-0.4557464]])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_gradcheck_and_chunking(monkeypatch: pytest.MonkeyPatch, temperature: float) -> None:
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 12)  # V = 5 -> two rows per chunk
    gen = torch.Generator().manual_seed(3)
    full = torch.randn(2, 6, 5, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 5, (2, 5), generator=gen)
    logits = full[:, :-1].clone().requires_grad_(True)
    ref = torch.log_softmax(logits / temperature, -1).gather(-1, targets[..., None]).squeeze(-1)
    torch.testing.assert_close(token_logprobs_from_logits(logits, targets, temperature), ref)
    assert torch.autograd.gradcheck(
        lambda z: token_logprobs_from_logits(z, targets, temperature), (logits,), eps=1e-6, atol=1e-6
    )
    # Non-contiguous input is read in place.
    sliced = full.detach().requires_grad_(True)
    out = token_logprobs_from_logits(sliced[:, :-1], targets, temperature)
    torch.testing.assert_close(out, ref.detach())
    out.sum().backward()
    assert sliced.grad is not None and (sliced.grad[:, -1] == 0).all()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_and_entropy_in_one_pass(monkeypatch: pytest.MonkeyPatch, temperature: float) -> None:
    """The fused pass gives what the two functions give apart (hand rows with -inf and huge logits,
    random chunked ones), and the same logprob gradient; its entropy carries no gradient."""
    _close(
        token_logprobs_and_entropy(
            torch.tensor([[[0.0, LN3, -INF, -INF], [1000.0, 1000.0, -1000.0, -INF]]]), torch.tensor([[1, 0]])
        )[1],
        [[0.5623351, 0.6931472]],
    )
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 12)  # V = 5 -> two rows per chunk
    gen = torch.Generator().manual_seed(5)
    full = torch.randn(2, 6, 5, generator=gen, dtype=torch.float64) * 4
    full[0, 2, 3] = -INF
    targets = torch.randint(0, 3, (2, 5), generator=gen)
    a = full[:, :-1].clone().requires_grad_(True)
    b = full[:, :-1].clone().requires_grad_(True)
    lp, ent = token_logprobs_and_entropy(a, targets, temperature)
    torch.testing.assert_close(ent, entropy_from_logits(full[:, :-1], temperature))
    ref = token_logprobs_from_logits(b, targets, temperature)
    torch.testing.assert_close(lp, ref)
    w = torch.randn(2, 5, generator=gen, dtype=torch.float64)
    (lp * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(a.grad, b.grad)
    assert not ent.requires_grad


def test_token_logprobs_low_precision_upcast() -> None:
    gen = torch.Generator().manual_seed(4)
    logits = (torch.randn(2, 3, 11, generator=gen) * 5).to(torch.bfloat16).requires_grad_(True)
    targets = torch.randint(0, 11, (2, 3), generator=gen)
    out = token_logprobs_from_logits(logits, targets)
    assert out.dtype == torch.float32
    ref = torch.log_softmax(logits.detach().float(), -1).gather(-1, targets[..., None]).squeeze(-1)
    torch.testing.assert_close(out, ref)  # computed in float32 from the bf16 values
    out.sum().backward()
    assert logits.grad is not None and logits.grad.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------ edges
# Boundaries, clamps, dtypes and error messages: each test here fails for a specific wrong variant of
# trainer/losses.py (found with `make mutants`, docs/testing.md).

E20 = math.exp(20.0)


def _ones(n: int) -> torch.Tensor:
    return torch.ones(1, n)


def test_bands_and_caps_are_inclusive() -> None:
    # On-policy tokens have rho = 1 exactly. mask_low = mask_high = 1 (allowed by config validation)
    # keeps them, decoupled_cap = 1 keeps them, tis_cap = 1 does not count them as truncated.
    lp = torch.tensor([[-1.0, -2.0]])
    for cfg in (
        _cfg(off_policy="mask", mask_low=1.0, mask_high=1.0),
        _cfg(off_policy="decoupled", decoupled_cap=1.0),
        _cfg(off_policy="tis", tis_cap=1.0),
    ):
        loss, m, grad = _run(lp, lp, lp, _ones(2), _ones(2), cfg)
        _close(loss, -1.0)
        _close(grad, [[-0.5, -0.5]])
        _close(m["masked_frac"], 0.0)
        _close(m["is_truncated_frac"], 0.0)
    # decoupled_cap = 1 drops a token whose rho is 2 (rho > cap), keeps the rho = 1 one.
    behav = lp - torch.tensor([[0.0, LN2]])
    loss, m, _ = _run(lp, lp, behav, _ones(2), _ones(2), _cfg(off_policy="decoupled", decoupled_cap=1.0))
    _close(loss, -0.5)
    _close(m["masked_frac"], 0.5)


def test_truncation_is_reported_for_tis_only() -> None:
    # rho = 3 > tis_cap = 2, but the mask mode (band [0.5, 4]) truncates nothing.
    prox = torch.zeros(1, 1)
    behav = -_log([3.0])[None]
    _, m, _ = _run(prox, prox, behav, _ones(1), _ones(1), _cfg(off_policy="mask", mask_high=4.0, tis_cap=2.0))
    _close(m["is_truncated_frac"], 0.0)
    _, m, _ = _run(prox, prox, behav, _ones(1), _ones(1), _cfg(off_policy="tis", tis_cap=2.0))
    _close(m["is_truncated_frac"], 1.0)


def test_clip_fraction_sides_follow_the_sign_of_the_advantage() -> None:
    # A = 0.5 with r = 1.5 > 1.2 is clipped on the high side only; a single token is the whole mean.
    lp = _log([1.5])[None]
    _, m, _ = _run(lp, torch.zeros(1, 1), torch.zeros(1, 1), torch.full((1, 1), 0.5), _ones(1), _cfg())
    _close(m["clip_frac"], 1.0)
    _close(m["clip_frac/high"], 1.0)
    _close(m["clip_frac/low"], 0.0)


def test_sequence_level_units_are_the_non_empty_sequences() -> None:
    # Rows: one loss token with rho = 3, no loss token, two loss tokens with rho 2 and 2 (product 4).
    prox = torch.zeros(3, 2)
    behav = -torch.tensor([[LN3, 0.0], [0.0, 0.0], [LN2, LN2]])
    mask = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    cfg = _cfg(off_policy="tis", off_policy_level="sequence", tis_cap=10.0, loss_agg="seq_mean")
    loss, m, _ = _run(prox, prox, behav, torch.ones(3, 2), mask, cfg)
    _close(m["is_ratio/mean"], 3.5)  # (3 + 4) / 2: the empty row is not a unit
    _close(m["is_ratio/min"], 3.0)
    _close(loss, -3.5)  # seq_mean of -rho: (-3 - 4) / 2


def test_gspo_one_token_sequence_uses_its_own_log_ratio() -> None:
    # A one-token sequence: s = exp(0.1 / 1), not exp(0.1 / 2).
    lp = torch.tensor([[0.1, 0.0]])
    mask = torch.tensor([[1.0, 0.0]])
    cfg = _cfg(ratio_level="sequence", clip_low=0.3, clip_high=0.3)
    loss, m, _ = _run(lp, torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), mask, cfg)
    _close(m["policy_ratio/mean"], math.exp(0.1))
    _close(loss, -math.exp(0.1))


def test_extreme_log_ratios_are_clamped_to_20() -> None:
    def close_rel(actual: torch.Tensor, expected: float) -> None:
        torch.testing.assert_close(
            actual.detach().double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=0
        )

    # Token ratios exp(+-30) are clamped to exp(+-20); beyond the clamp the gradient is 0.
    lp = torch.tensor([[30.0, -30.0]])
    zeros = torch.zeros(1, 2)
    adv = torch.tensor([[-1.0, 1.0]])  # both on the unclipped (pessimistic) side of the clip
    loss, m, grad = _run(lp, zeros, zeros, adv, _ones(2), _cfg(off_policy="none"))
    close_rel(m["policy_ratio/max"], E20)
    close_rel(m["policy_ratio/min"], math.exp(-20.0))
    close_rel(loss, (E20 - math.exp(-20.0)) / 2)  # token_mean of -A * r
    _close(grad, [[0.0, 0.0]])
    # k3 of the clamped log-ratio: exp(20) - 1 - 20 and exp(-20) - 1 + 20, averaged.
    close_rel(m["approx_kl"], (E20 - 21.0 + math.exp(-20.0) + 19.0) / 2)
    # Sequence-level behaviour ratios: the summed log-ratio 30 (or -30) is clamped too.
    behav = -torch.tensor([[15.0, 15.0], [-15.0, -15.0]])
    cfg = _cfg(off_policy="tis", off_policy_level="sequence", tis_cap=2.0)
    _, m, _ = _run(torch.zeros(2, 2), torch.zeros(2, 2), behav, torch.ones(2, 2), torch.ones(2, 2), cfg)
    close_rel(m["is_ratio/max"], E20)
    close_rel(m["is_ratio/min"], math.exp(-20.0))
    # GSPO: the mean log-ratio 30 (or -30) of a sequence is clamped.
    lp = torch.tensor([[30.0, 30.0], [-30.0, -30.0]])
    cfg = _cfg(ratio_level="sequence", off_policy="none")
    _, m, _ = _run(lp, torch.zeros(2, 2), torch.zeros(2, 2), torch.ones(2, 2), torch.ones(2, 2), cfg)
    close_rel(m["policy_ratio/max"], E20)
    close_rel(m["policy_ratio/min"], math.exp(-20.0))
    # k3 KL estimator: d = +-30 clamped to +-20.
    k3 = kl_estimate(torch.tensor([30.0, -30.0]), torch.zeros(2), "k3")
    close_rel(k3[0], math.exp(-20.0) - 1.0 + 20.0)
    close_rel(k3[1], E20 - 1.0 - 20.0)


def test_computation_dtypes() -> None:
    # float32 logprobs with float64 other inputs: float32 loss; metrics are float32 for float64 inputs.
    lp = torch.tensor([[-1.0, -2.0]])
    d = lp.double()
    loss, m, _ = _run(lp, d, d, _ones(2).double(), _ones(2), _cfg())
    assert loss.dtype == torch.float32
    loss, m, _ = _run(d, d, d, _ones(2).double(), _ones(2), _cfg(ratio_level="sequence"))
    assert loss.dtype == torch.float64
    assert {v.dtype for v in m.values()} == {torch.float32}
    # bfloat16 logprobs are computed in float32.
    loss, _, _ = _run(lp.bfloat16(), lp, lp, _ones(2), _ones(2), _cfg())
    assert loss.dtype == torch.float32
    # value loss: float32 values with float64 targets stay float32; bfloat16 values go to float32.
    v32 = torch.tensor([[0.5]])
    assert value_loss(v32, v32.double(), v32.double(), _ones(1), clip=0.2).dtype == torch.float32
    assert value_loss(v32.bfloat16(), v32, v32, _ones(1), clip=0.2).dtype == torch.float32


def test_all_masked_batch_gives_zero_float32_metrics() -> None:
    x = torch.tensor([[-1.0, -2.0]])
    loss, m, grad = _run(x, x, x, _ones(2), torch.zeros(1, 2), _cfg(off_policy="tis"))
    _close(loss, 0.0)
    _close(grad, [[0.0, 0.0]])
    for key, value in m.items():
        assert value.dtype == torch.float32 and value.dim() == 0, key
        _close(value, 0.0)


def test_value_loss_tie_keeps_the_unclipped_gradient() -> None:
    # old 0, clip 0.25, v 1 -> v_clip 0.25; R = 0.625 is exactly between: both errors 0.140625.
    values = torch.tensor([[1.0]], requires_grad=True)
    loss = value_loss(values, torch.zeros(1, 1), torch.tensor([[0.625]]), _ones(1), clip=0.25)
    _close(loss, 0.5 * 0.140625)
    loss.backward()
    _close(values.grad, [[0.375]])  # d/dv 0.5 (v - R)^2; the clipped branch would give 0


def test_errors_name_the_problem() -> None:
    x = torch.zeros(3)
    with pytest.raises(
        ValueError, match=r"policy_loss expects \[B, T\] tensors of one shape, got \[\(3,\), \(3,\)"
    ):
        policy_loss(x, x, x, x, x, _cfg())
    y = torch.zeros(1, 2)
    with pytest.raises(ValueError, match=r"got \[\(1, 2\), \(1, 2\), \(1, 2\), \(1, 3\), \(1, 2\)\]"):
        policy_loss(y, y, y, torch.zeros(1, 3), y, _cfg())
    for cfg, message in (
        (_cfg(off_policy_level="word"), "unknown off_policy_level 'word'"),
        (_cfg(off_policy="clip"), "unknown off_policy correction 'clip'"),
        (_cfg(ratio_level="word"), "unknown ratio_level 'word'"),
    ):
        with pytest.raises(ValueError, match=message):
            policy_loss(y, y, y, y, y, cfg)
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'; expected k1, k2 or k3"):
        kl_estimate(y, y, "k4")
    logits, targets = torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long)
    for fn in (
        lambda t: token_logprobs_from_logits(logits, targets, t),
        lambda t: entropy_from_logits(logits, t),
    ):
        with pytest.raises(ValueError, match=r"temperature must be > 0, got 0\.0"):
            fn(0.0)
    with pytest.raises(
        ValueError, match=r"expected logits \[B, T, V\] and targets \[B, T\], got \(1, 2, 3\), \(1, 3\)"
    ):
        token_logprobs_from_logits(logits, torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(
        ValueError, match=r"expected logits \[B, T, V\] and targets \[B, T\], got \(1, 1, 2, 3\), \(1, 2\)"
    ):
        token_logprobs_from_logits(logits[None], targets)
    with pytest.raises(ValueError, match=r"expected logits \[B, T, V\], got \(1, 1, 2, 3\)"):
        entropy_from_logits(logits[None])


def test_two_dimensional_logits_and_temperature() -> None:
    # [T, V] logits (0, 2 ln 3): at temperature 2 they are (0, ln 3), p = (1/4, 3/4).
    logits = torch.tensor([[0.0, 2 * LN3], [0.0, 2 * LN3]])
    _close(
        token_logprobs_from_logits(logits, torch.tensor([1, 0]), temperature=2.0), [-0.2876821, -1.3862944]
    )
    _close(entropy_from_logits(logits, temperature=2.0), [0.5623351, 0.5623351])
    # Same for [B, T, V] at temperature 2 (not only at 1).
    _close(entropy_from_logits(logits[None], temperature=2.0), [[0.5623351, 0.5623351]])


def test_low_precision_logits_are_upcast_for_entropy() -> None:
    gen = torch.Generator().manual_seed(5)
    logits = (torch.randn(2, 3, 11, generator=gen) * 5).to(torch.bfloat16)
    z = logits.float()
    ref = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
    ent = entropy_from_logits(logits)
    assert ent.dtype == torch.float32
    torch.testing.assert_close(ent, ref, rtol=0, atol=1e-5)


def test_float64_logprob_gradients_are_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 12)
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(2, 4, 5, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 5, (2, 4), generator=gen)
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    w = torch.randn(2, 4, generator=gen, dtype=torch.float64)
    (token_logprobs_from_logits(a, targets, 0.7) * w).sum().backward()
    (torch.log_softmax(b / 0.7, -1).gather(-1, targets[..., None]).squeeze(-1) * w).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)


def test_aggregate_errors_and_single_sequence() -> None:
    x = torch.tensor([[1.0, 3.0]])
    # One non-empty sequence: seq_sum_norm = (1 + 3) / (1 * loss_norm); loss_norm 1 is allowed.
    _close(aggregate(x, _ones(2), "seq_sum_norm", loss_norm=1.0), 4.0)
    with pytest.raises(ValueError) as e:
        aggregate(x, _ones(2), "seq_sum_norm", loss_norm=0.0)
    assert str(e.value) == "loss_norm must be > 0, got 0.0"
    with pytest.raises(ValueError) as e:
        aggregate(x, _ones(2), "sum")
    assert (
        str(e.value) == "unknown loss aggregation 'sum'; expected one of token_mean, seq_mean, seq_sum_norm"
    )
    with pytest.raises(ValueError) as e:
        aggregate(torch.zeros(2), torch.zeros(2), "token_mean")
    assert str(e.value) == "aggregate expects [B, T] per_token and mask, got (2,), (2,)"
    with pytest.raises(ValueError, match=r"got \(1, 2\), \(1, 3\)"):
        aggregate(x, torch.ones(1, 3), "token_mean")


def test_approx_kl_clamps_large_negative_log_ratios() -> None:
    # One token, log-ratio -30 clamped to -20: k3 = exp(-20) - 1 + 20 (not exp(-30) - 1 + 30).
    lp = torch.tensor([[-30.0]])
    _, m, _ = _run(lp, torch.zeros(1, 1), torch.zeros(1, 1), _ones(1), _ones(1), _cfg(off_policy="none"))
    _close(m["approx_kl"], 19.0)


def test_gspo_ratio_stats_skip_dropped_sequences() -> None:
    # Row 0 is dropped by the mask band (rho = 4 > 2); row 1 (rho = 1) has s = exp(0.2).
    lp = torch.tensor([[1.0, 1.0], [0.2, 0.2]])
    behav = -torch.tensor([[LN2, LN2], [0.0, 0.0]])
    cfg = _cfg(ratio_level="sequence", off_policy="mask", off_policy_level="sequence", clip_high=0.5)
    _, m, _ = _run(lp, torch.zeros(2, 2), behav, torch.ones(2, 2), torch.ones(2, 2), cfg)
    _close(m["policy_ratio/mean"], math.exp(0.2))
    _close(m["policy_ratio/max"], math.exp(0.2))
