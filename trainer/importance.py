"""Importance sampling for off-policy tokens: pure, shape-checked functions of [B, T] tensors.

Three logprobs of each generated token (conventions of trainer/losses.py, position t = token t+1):

    mu       `behavior`        what the engine reported when it sampled the token (policy version v,
                               the engine's kernels and precision);
    pi_v     `behavior_train`  the trainer's own logprob of the token under version v's weights;
    pi_prox  `proximal`        the trainer's logprob under the current weights (before this update).

The behaviour ratio pi_prox / mu is the product of two factors with different causes:

    discrepancy  d = pi_v / mu       engine vs trainer at the same weights (kernels, precision, sampler);
                                     1 up to float noise when both run float32 (docs/algorithms.md);
    staleness    s = pi_prox / pi_v  how far the policy moved since it sampled the token (0 versions: 1).

`factor` turns one log-ratio into a weight and a keep mask, at one of three levels and in one of
seven modes (below); `importance_weights` combines them into the weight and keep mask the policy loss
applies (trainer/losses.py `policy_loss`). `algorithm.off_policy` = none | tis | mask | decoupled
keep their meaning: one factor on the whole ratio pi_prox / mu. `algorithm.off_policy=factored`
handles the discrepancy (`algorithm.discrepancy.*`) and the staleness (`algorithm.staleness.*`) each
their own way.

Levels (unit = what a decision applies to; x_t = a token's log-ratio, 0 outside the mask):
    token     X_t = x_t                         per token;
    sequence  X_i = sum_t x_t                   per sequence: the importance weight of the whole sequence;
    geomean   X_i = (1 / |y_i|) sum_t x_t       per sequence: the geometric mean of its token ratios
                                                (length-normalised, so long sequences are not extreme).
Modes, on w = exp(X) (clamped to exp(+-20)):
    none      1                                  the factor is ignored;
    weight    w                                  untruncated importance weight (unbiased, unbounded);
    truncate  min(w, high)                       TIS: bias for bounded variance;
    clip      clamp(w, low, high)                two-sided;
    mask      w, units with w outside [low, high] dropped   masked IS (MIS);
    reject    1, units with w outside [low, high] dropped   rejection: unbiased on what it keeps;
    m2        w, the units with the largest X^2 dropped until the mean of X^2 over the kept units is
              <= m2_tau                          M2PO's second-moment trust region (Zheng et al. 2025).
Dropped tokens contribute 0 to the loss but stay in the aggregation's denominators (trainer/losses.py).

Where pi_v is not available the caller passes `behavior_train = behavior` for those tokens: the
discrepancy is taken as 1 and the whole ratio counts as staleness (see `trainer/train_step.py`: the trainer
keeps the weights of the last `algorithm.behavior_snapshots` versions to score stale tokens at their
own version; fresh tokens, version == current, have pi_v = pi_prox exactly).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from slime.core.config import AlgorithmConfig, IsFactorConfig

LOG_RATIO_CLAMP = 20.0
LEGACY = ("none", "tis", "mask", "decoupled")
# Staleness buckets of the per-bucket metrics: (name, lowest, highest) versions behind.
BUCKETS = (("0", 0, 0), ("1", 1, 1), ("2", 2, 2), ("3-4", 3, 4), ("5-8", 5, 8), ("9+", 9, 1 << 30))


@dataclass
class Factor:
    """One factor's decision. `weight` and `keep` are [B, T] (per token, a sequence's value repeated);
    `unit_ratio` is the untouched ratio per unit ([B, T] at token level, [B] per sequence) where
    `unit_valid`, and `changed` (same shape) marks the units whose weight truncation or clipping
    changed."""

    weight: Tensor
    keep: Tensor
    changed: Tensor
    unit_ratio: Tensor
    unit_valid: Tensor

    def changed_tokens(self, mask: Tensor) -> Tensor:
        """`changed` per loss token [B, T]."""
        c = self.changed if self.changed.dim() == 2 else self.changed[:, None].expand_as(mask)
        return c & (mask != 0)


def unit_log_ratio(log_ratio: Tensor, m: Tensor, level: str) -> tuple[Tensor, Tensor, Tensor]:
    """(X per unit, valid units, X per token [B, T]) for `log_ratio` [B, T] (already 0 outside `m`)."""
    if level == "token":
        return log_ratio, m, log_ratio
    tokens = m.sum(dim=-1)  # [B]
    total = log_ratio.sum(dim=-1)  # [B]
    if level == "sequence":
        x = total
    elif level == "geomean":
        x = total / tokens.clamp(min=1)
    else:
        raise ValueError(f"unknown importance-sampling level {level!r}; expected token, sequence or geomean")
    x = x.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return x, tokens > 0, x[:, None].expand_as(log_ratio)


def m2_keep(x: Tensor, valid: Tensor, tau: float) -> Tensor:
    """M2PO's trust region: of the valid units (bool, same shape as `x`), drop those with the largest
    x^2 until the mean of x^2 over the kept ones is <= tau (none dropped when it already is; one unit
    is always kept). Returns the kept units (False where not valid)."""
    sq = torch.where(valid, x.detach().to(torch.float64).square(), 0.0).flatten()
    n = int(valid.sum())
    keep = valid.flatten().clone()
    if n == 0:
        return keep.view_as(valid)
    order = torch.argsort(torch.where(valid.flatten(), sq, -1.0), descending=True, stable=True)[:n]
    s = sq[order]  # [n] descending
    # mean of the n - j smallest, j = 0..n-1 (suffix sums)
    suffix = s.flip(0).cumsum(0).flip(0)  # suffix[j] = sum_{i >= j} s_i
    means = suffix / torch.arange(n, 0, -1, dtype=s.dtype, device=s.device)
    ok = (means <= tau).nonzero()
    drop = int(ok[0, 0]) if ok.numel() else n - 1
    keep[order[:drop]] = False
    return keep.view_as(valid)


def factor(log_ratio: Tensor, mask: Tensor, cfg: IsFactorConfig, m2_tau: float = 0.04) -> Factor:
    """The weight and keep mask of one importance-sampling factor (module docstring).

    Args:
        log_ratio: [B, T] log of the factor's ratio per token (any value outside `mask`).
        mask: [B, T] loss tokens (non-zero).
        cfg: level, mode, low, high.
        m2_tau: the second-moment bound of mode m2.
    """
    m = mask != 0
    dt = torch.float64 if log_ratio.dtype == torch.float64 else torch.float32
    x_tok = torch.where(m, log_ratio.detach().to(dt), 0.0).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    x_unit, unit_valid, x = unit_log_ratio(x_tok, m, str(cfg.level))
    w = torch.exp(x)  # [B, T]
    mode = str(cfg.mode)
    keep = m
    weight = torch.ones_like(w)
    if mode == "none":
        pass
    elif mode == "weight":
        weight = w
    elif mode == "truncate":
        weight = w.clamp(max=cfg.high)
    elif mode == "clip":
        weight = w.clamp(cfg.low, cfg.high)
    elif mode in ("mask", "reject"):
        keep = m & (w >= cfg.low) & (w <= cfg.high)
        weight = w if mode == "mask" else weight
    elif mode == "m2":
        kept_units = m2_keep(x_unit, unit_valid, m2_tau)
        keep = m & (kept_units if kept_units.dim() == 2 else kept_units[:, None].expand_as(m))
        weight = w
    else:
        raise ValueError(f"unknown importance-sampling mode {mode!r}")
    w_unit = torch.exp(x_unit)
    if mode == "truncate":
        changed = unit_valid & (w_unit > cfg.high)
    elif mode == "clip":
        changed = unit_valid & ((w_unit > cfg.high) | (w_unit < cfg.low))
    else:
        changed = torch.zeros_like(unit_valid)
    return Factor(weight=weight, keep=keep, changed=changed, unit_ratio=w_unit, unit_valid=unit_valid)


def legacy_factor(cfg: AlgorithmConfig) -> IsFactorConfig:
    """The one factor on pi_prox / mu that `algorithm.off_policy` none | tis | mask | decoupled mean."""
    level = cfg.off_policy_level
    if str(level) not in ("token", "sequence", "geomean"):
        raise ValueError(f"unknown off_policy_level {str(level)!r}; expected token, sequence or geomean")
    off = str(cfg.off_policy)
    if off == "none":
        return IsFactorConfig(level=level, mode="none")  # type: ignore[arg-type]
    if off == "tis":
        return IsFactorConfig(level=level, mode="truncate", high=cfg.tis_cap)  # type: ignore[arg-type]
    if off == "mask":
        return IsFactorConfig(level=level, mode="reject", low=cfg.mask_low, high=cfg.mask_high)  # type: ignore[arg-type]
    if off == "decoupled":
        if cfg.decoupled_cap > 0:
            return IsFactorConfig(level=level, mode="mask", low=0.0, high=cfg.decoupled_cap)  # type: ignore[arg-type]
        return IsFactorConfig(level=level, mode="weight")  # type: ignore[arg-type]
    raise ValueError(f"unknown off_policy correction {off!r}")


@dataclass
class Weights:
    """What the policy loss applies: `weight` [B, T] (detached) multiplies each token's clipped loss,
    tokens outside `keep` [B, T] are dropped; `anchor` [B, T] is the clip's "old" policy (pi_prox, or mu
    for off_policy=none). `rho_unit`/`rho_valid`: the behaviour ratio pi_prox / mu per unit before any
    handling (metrics; per sequence at a legacy correction's sequence level, else per token);
    `changed`: those units whose weight truncation or clipping changed."""

    weight: Tensor
    keep: Tensor
    anchor: Tensor
    rho_unit: Tensor
    rho_valid: Tensor
    changed: Tensor


def importance_weights(
    proximal: Tensor, behavior: Tensor, behavior_train: Tensor, mask: Tensor, cfg: AlgorithmConfig
) -> Weights:
    """The off-policy correction of `cfg.off_policy` (module docstring); [B, T] tensors, 0 (or anything
    finite) outside `mask`. `behavior_train` matters only for off_policy=factored."""
    m = mask != 0
    log_rho = torch.where(m, proximal - behavior, 0.0)
    off = str(cfg.off_policy)
    if off in LEGACY:
        f = factor(log_rho, mask, legacy_factor(cfg), cfg.m2_tau)
        anchor = behavior if off == "none" else proximal
        return Weights(f.weight, f.keep, anchor, f.unit_ratio, f.unit_valid, f.changed)
    if off != "factored":
        raise ValueError(f"unknown off_policy correction {off!r}")
    d = factor(torch.where(m, behavior_train - behavior, 0.0), mask, cfg.discrepancy, cfg.m2_tau)
    s = factor(torch.where(m, proximal - behavior_train, 0.0), mask, cfg.staleness, cfg.m2_tau)
    x = log_rho.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    changed = d.changed_tokens(mask) | s.changed_tokens(mask)
    return Weights(d.weight * s.weight, d.keep & s.keep, proximal, torch.exp(x), m, changed)


def behavior_train_logprobs(
    proximal: Tensor, behavior: Tensor, snapshot: Tensor | None, known: Tensor | None, fresh: Tensor
) -> Tensor:
    """pi_v per token [B, T]: pi_prox where the token is fresh (its version is the current one), the
    snapshot's logprob where `known`, else mu (the fallback: discrepancy 1, all of it staleness)."""
    out = torch.where(fresh, proximal, behavior)
    if snapshot is not None and known is not None:
        out = torch.where(known & ~fresh, snapshot, out)
    return out


def _masked_mean(x: Tensor, valid: Tensor) -> float:
    return float(torch.where(valid, x.float(), 0.0).sum() / valid.sum().clamp(min=1))


def offpolicy_stats(
    proximal: Tensor,
    behavior: Tensor,
    behavior_train: Tensor,
    weights: Weights,
    mask: Tensor,
    staleness: Tensor | None,
) -> dict[str, tuple[float, float]]:
    """Per-step statistics as {key: (mean, weight)} for weighted averaging over micro-batches and ranks
    (trainer/step_metrics.py). With n loss tokens:

    - `offpolicy/w_mean`, `offpolicy/w_sq_mean`: mean of the applied weight (0 where dropped) and of its
      square; the step's normalised effective sample size is w_mean^2 / w_sq_mean (`ess`);
    - `offpolicy/raw_w_mean`, `offpolicy/raw_w_sq_mean`: the same for the untouched pi_prox / mu;
    - `offpolicy/log_ratio_m2`: mean of log(pi_prox / mu)^2 (M2PO's statistic);
    - `offpolicy/discrepancy_abs`, `offpolicy/staleness_abs`: mean |log d| and |log s|;
    - per staleness bucket b (`staleness` [B, T] = versions behind): `offpolicy/stale_b/frac` (share of
      loss tokens), `/is_ratio_mean`, `/log_ratio_m2`, `/is_weight_mean` (applied, 0 where dropped).
    """
    m = mask != 0
    n = float(m.sum())
    log_rho = torch.where(m, proximal - behavior, 0.0).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    applied = torch.where(weights.keep, weights.weight, 0.0)
    raw = torch.exp(log_rho)
    out = {
        "offpolicy/w_mean": (_masked_mean(applied, m), n),
        "offpolicy/w_sq_mean": (_masked_mean(applied.square(), m), n),
        "offpolicy/raw_w_mean": (_masked_mean(raw, m), n),
        "offpolicy/raw_w_sq_mean": (_masked_mean(raw.square(), m), n),
        "offpolicy/log_ratio_m2": (_masked_mean(log_rho.square(), m), n),
        "offpolicy/discrepancy_abs": (_masked_mean((behavior_train - behavior).abs(), m), n),
        "offpolicy/staleness_abs": (_masked_mean((proximal - behavior_train).abs(), m), n),
    }
    if staleness is not None:
        for name, lo, hi in BUCKETS:
            b = m & (staleness >= lo) & (staleness <= hi)
            nb = float(b.sum())
            out[f"offpolicy/stale_{name}/frac"] = (nb / max(n, 1.0), n)
            out[f"offpolicy/stale_{name}/is_ratio_mean"] = (_masked_mean(raw, b), nb)
            out[f"offpolicy/stale_{name}/log_ratio_m2"] = (_masked_mean(log_rho.square(), b), nb)
            out[f"offpolicy/stale_{name}/is_weight_mean"] = (_masked_mean(applied, b), nb)
    return out


def ess(w_mean: float, w_sq_mean: float) -> float:
    """Kish's effective sample size over n, (sum w)^2 / (n sum w^2) = mean(w)^2 / mean(w^2), in [0, 1]
    (1: equal weights; 1/n: one weight carries everything); 1 for an empty or all-zero batch."""
    return 1.0 if w_sq_mean <= 0 else min(1.0, w_mean * w_mean / w_sq_mean)


def ess_lr_scale(ess_value: float, power: float, floor: float) -> float:
    """VCPO-style step control: the learning-rate multiplier ess^power, at least `floor` (power 0: 1)."""
    if power <= 0:
        return 1.0
    return max(floor, ess_value**power)


def fallback_gap(
    proximal: Tensor, behavior: Tensor, exact: Tensor, stale_known: Tensor, cfg: AlgorithmConfig
) -> dict[str, tuple[float, float]]:
    """What the fallback (pi_v := mu) would change where the exact pi_v is known (`stale_known` [B, T]:
    stale tokens scored under their own version's snapshot): {key: (mean, weight)} with
    `offpolicy/fallback/discrepancy_abs` (mean |log pi_v - log mu|: the discrepancy it would miss),
    `offpolicy/fallback/logw_gap` (mean |log w_exact - log w_fallback| of the applied weights, tokens
    both keep) and `offpolicy/fallback/keep_diff` (share of tokens whose keep decision differs)."""
    n = float(stale_known.sum())
    if str(cfg.off_policy) != "factored":
        exact_w = fallback_w = importance_weights(proximal, behavior, exact, stale_known, cfg)
    else:
        exact_w = importance_weights(proximal, behavior, exact, stale_known, cfg)
        fallback_w = importance_weights(proximal, behavior, behavior, stale_known, cfg)
    both = stale_known & exact_w.keep & fallback_w.keep
    gap = (torch.log(exact_w.weight.clamp(min=1e-30)) - torch.log(fallback_w.weight.clamp(min=1e-30))).abs()
    return {
        "offpolicy/fallback/discrepancy_abs": (_masked_mean((exact - behavior).abs(), stale_known), n),
        "offpolicy/fallback/logw_gap": (_masked_mean(gap, both), float(both.sum())),
        "offpolicy/fallback/keep_diff": (_masked_mean(exact_w.keep != fallback_w.keep, stale_known), n),
    }
