"""Losses, KL, entropy and logprob helpers against hand-computed values (trainer/losses.py)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import trainer.losses as losses
from slime.config import AlgorithmConfig
from trainer.losses import (
    aggregate,
    entropy_from_logits,
    kl_estimate,
    policy_loss,
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
