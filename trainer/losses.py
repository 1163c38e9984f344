"""Policy and value losses, KL estimators, entropy and token logprobs: pure functions of tensors.

Conventions (shared with `trainer.advantages`):

- Per-token tensors are [B, T], aligned with *predicted* tokens: position t holds the logprob of
  token t+1 given tokens <= t (already shifted).
- `mask` [B, T] is 1.0 on tokens the policy generated (the loss mask), 0.0 on prompt, environment and
  padding tokens; anything non-zero counts. Masked positions never influence a loss, a gradient or a
  metric, even when they hold nan or inf (inputs are zeroed there with `torch.where` before any
  arithmetic, so no 0 * inf reaches autograd).
- Three logprobs of the same tokens:
    `logprobs`           current policy pi_theta, with grad;
    `proximal_logprobs`  pi_prox: the trainer's recomputation before this update (no grad), the
                         "old" policy of PPO and of the decoupled objective;
    `behavior_logprobs`  mu: what the inference engine reported when it sampled (possibly several
                         policy versions old, and computed by different kernels).
- Log-ratios are clamped to [-20, 20] before `exp`, so ratios stay finite; beyond that the gradient
  through the ratio is 0 (such tokens are clipped or masked in any sane configuration).
- Computation is in float32 (float64 stays float64), whatever the input dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from slime.core.config import AlgorithmConfig
from trainer.importance import importance_weights

LOG_RATIO_CLAMP = 20.0
# Elements of one [rows, V] float32 slab materialised at a time by the logits functions (64 MiB).
# Module-level so tests can shrink it to exercise chunking.
CHUNK_ELEMENTS = 1 << 24

AGG_MODES = ("token_mean", "seq_mean", "seq_sum_norm")


def _dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _safe_exp(log_x: Tensor) -> Tensor:
    return torch.exp(log_x.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


# --------------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------------


def aggregate(per_token: Tensor, mask: Tensor, mode: str, loss_norm: float | None = None) -> Tensor:
    """Reduce a per-token loss [B, T] to a scalar over the tokens where mask != 0.

    Modes (S = sequences with at least one loss token; |y_i| = loss tokens of sequence i):

    - "token_mean":   sum_{i,t} x / sum_i |y_i|                 every token weighs the same (DAPO).
    - "seq_mean":     (1/|S|) sum_{i in S} (1/|y_i|) sum_t x      every sequence weighs the same (GRPO).
    - "seq_sum_norm": sum_{i,t} x / (|S| * loss_norm)            Dr. GRPO: a constant per-sequence
                      normaliser, so a token's weight does not depend on its sequence's length.
                      `loss_norm` defaults to T (this batch's padded length); pass a constant (e.g.
                      the maximum response length) to make it the same across batches.

    A sequence without loss tokens (e.g. a failed episode padded into the batch) is not a sample: it
    counts in no denominator. An all-masked batch gives 0, not nan.

    Gradient accumulation: each call normalises within its micro-batch. To reproduce the full-batch
    value, weight micro-batch k's result by (its loss tokens / all loss tokens) for token_mean and by
    (its non-empty sequences / all non-empty sequences) for seq_mean and seq_sum_norm.

    Args:
        per_token: [B, T] loss per token.
        mask: [B, T] 1.0 on tokens that count.
        mode: one of AGG_MODES.
        loss_norm: the seq_sum_norm constant (ignored by the other modes).

    Returns:
        0-dim tensor, differentiable w.r.t. per_token (gradient exactly 0 at masked positions).
    """
    if per_token.shape != mask.shape or per_token.dim() != 2:
        raise ValueError(
            f"aggregate expects [B, T] per_token and mask, got {tuple(per_token.shape)}, {tuple(mask.shape)}"
        )
    m = mask != 0
    x = torch.where(m, per_token, 0.0)  # [B, T]
    if mode == "token_mean":
        return x.sum() / m.sum().clamp(min=1)
    tokens = m.sum(dim=-1)  # [B]
    num_seqs = (tokens > 0).sum().clamp(min=1)
    if mode == "seq_mean":
        return (x.sum(dim=-1) / tokens.clamp(min=1)).sum() / num_seqs
    if mode == "seq_sum_norm":
        norm = float(per_token.shape[1]) if loss_norm is None else float(loss_norm)
        if norm <= 0:
            raise ValueError(f"loss_norm must be > 0, got {loss_norm}")
        return x.sum() / (num_seqs * norm)
    raise ValueError(f"unknown loss aggregation {mode!r}; expected one of {', '.join(AGG_MODES)}")


def _masked_mean(x: Tensor, valid: Tensor) -> Tensor:
    """Detached mean of x over valid (bool, same shape); 0 when nothing is valid."""
    x = torch.where(valid, x.detach().to(torch.float32), 0.0)
    return x.sum() / valid.sum().clamp(min=1)


def _stats(x: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Detached (mean, max, min) of x over valid; zeros when nothing is valid."""
    x = x.detach().to(torch.float32)
    if not bool(valid.any()):
        zero = x.new_zeros(())
        return zero, zero, zero
    v = x[valid]
    return v.mean(), v.max(), v.min()


# --------------------------------------------------------------------------------------------------
# Policy loss
# --------------------------------------------------------------------------------------------------


def policy_loss(
    logprobs: Tensor,
    proximal_logprobs: Tensor,
    behavior_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cfg: AlgorithmConfig,
    loss_norm: float | None = None,
    behavior_train_logprobs: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate policy loss with an off-policy correction for asynchronous rollouts.

    All tensors are [B, T]; only `logprobs` needs grad (the others are detached here). `advantages`
    are per token (use `broadcast_to_tokens` for sequence-level estimators). `behavior_train_logprobs`
    (pi_v, off_policy=factored only) defaults to `proximal_logprobs` (every token fresh).

    1. Anchor ("old" policy of the clip): pi_prox, except `cfg.off_policy == "none"` where the
       anchor is mu (proximal := behaviour: classic PPO straight on the engine's logprobs; the
       proximal recompute may then be skipped by passing behavior_logprobs twice).
    2. Policy ratio r = pi_theta / anchor:
       - `cfg.ratio_level == "token"`: r_t = exp(logprobs_t - anchor_t).
       - `"sequence"` (GSPO): s_i = exp(mean_t (logprobs - anchor)) over the sequence's loss tokens
         (length-normalised geometric mean), used at every token as
         s_{i,t} = sg[s_i] * pi_theta(y_t) / sg[pi_theta(y_t)], so the value is s_i (clipping is
         per sequence) and the gradient is s_i * grad logprob_t, i.e. GSPO's gradient.
    3. Per-token clipped loss with asymmetric range (DAPO clip-higher):
       l_t = max(-A_t r_t, -A_t clip(r_t, 1 - clip_low, 1 + clip_high)).
    4. Off-policy correction (trainer/importance.py `importance_weights`) from the behaviour ratio
       rho = pi_prox / mu (token level, the product over the sequence's loss tokens at
       `cfg.off_policy_level == "sequence"`, their geometric mean at "geomean"):
       - "none":      nothing beyond step 1.
       - "tis":       l_t *= min(rho, tis_cap)  (truncated importance sampling, detached).
       - "mask":      drop tokens (or whole sequences) with rho outside [mask_low, mask_high].
       - "decoupled": l_t *= rho, untruncated (AReaL's decoupled PPO: clip against pi_prox, correct
                      pi_prox -> mu by importance weighting); with `decoupled_cap > 0` tokens whose
                      rho exceeds the cap are dropped instead (AReaL's behav_imp_weight_cap).
       - "factored":  rho = d * s split at the trainer's logprob under the token's own version
                      (`behavior_train_logprobs`, pi_v: d = pi_v / mu, s = pi_prox / pi_v), each factor
                      weighted, truncated, clipped or masked as `cfg.discrepancy` / `cfg.staleness` say.
       Dropped tokens contribute 0 but stay in the aggregation's denominators, so the loss scale
       and the micro-batch weighting rule of `aggregate` do not depend on how many were dropped.
    5. `aggregate(l, mask, cfg.loss_agg, loss_norm)`.

    On-policy (logprobs == proximal == behaviour numerically) every variant has the value and the
    gradient of the plain policy gradient aggregate(-A * logprobs) (given tis_cap >= 1 and
    mask_low <= 1 <= mask_high, which config validation enforces).

    KL and entropy terms are not included; add e.g.
    `cfg.kl_coef * aggregate(kl_estimate(logprobs, ref, cfg.kl_estimator), mask, cfg.loss_agg, n)`.

    Returns:
        (loss: 0-dim tensor with grad, metrics: detached 0-dim float32 tensors):
        - "clip_frac": fraction of contributing tokens whose gradient the clip removed;
          "clip_frac/low" (A < 0, r below 1 - clip_low), "clip_frac/high" (A > 0, r above 1 + clip_high).
        - "policy_ratio/mean|max|min": r over contributing tokens (over sequences for ratio_level sequence).
        - "is_ratio/mean|max|min": rho before truncation/masking, over loss tokens (over non-empty
          sequences at off_policy_level sequence). Reported for every mode, "none" included.
        - "is_weight/mean": weight that multiplied the loss, over contributing tokens (1 for none/mask).
        - "is_truncated_frac": fraction of loss units whose weight truncation or clipping changed
          (tis: rho > tis_cap; factored: tokens where either factor's did).
        - "masked_frac": fraction of loss tokens dropped by the correction (mask/decoupled cap).
        - "approx_kl": k3 estimate of KL(anchor || pi_theta) over contributing tokens.
        - "mismatch/logprob_abs": mean |behavior - proximal| logprob over loss tokens.
        "contributing" = loss tokens not dropped by the correction.
    """
    shape = logprobs.shape
    if logprobs.dim() != 2 or not (
        proximal_logprobs.shape == behavior_logprobs.shape == advantages.shape == mask.shape == shape
    ):
        raise ValueError(
            "policy_loss expects [B, T] tensors of one shape, got "
            f"{[tuple(t.shape) for t in (logprobs, proximal_logprobs, behavior_logprobs, advantages, mask)]}"
        )
    dt = _dtype(logprobs)
    m = mask != 0  # [B, T] loss tokens

    def clean(x: Tensor) -> Tensor:  # zero masked positions before any arithmetic (nan/inf safe)
        return torch.where(m, x.to(dt), 0.0)

    lp = clean(logprobs)  # [B, T], grad flows to loss tokens only
    prox = clean(proximal_logprobs.detach())
    behav = clean(behavior_logprobs.detach())
    adv = clean(advantages.detach())
    tokens = m.sum(dim=-1)  # [B]

    # --- off-policy correction (trainer/importance.py) ------------------------------------------
    beh_train = prox if behavior_train_logprobs is None else clean(behavior_train_logprobs.detach())
    iw = importance_weights(prox, behav, beh_train, mask, cfg)
    weight, keep, anchor = iw.weight.to(dt), iw.keep, iw.anchor
    rho_unit, unit_valid = iw.rho_unit, iw.rho_valid

    # --- policy ratio r = pi_theta / anchor ------------------------------------------------------
    log_ratio_tok = lp - anchor  # [B, T]
    if cfg.ratio_level == "sequence":
        seq_log_ratio = log_ratio_tok.detach().sum(dim=-1) / tokens.clamp(min=1)  # [B]
        seq_log_ratio = seq_log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        # Value s_i at every token; gradient of the token's own logprob (lp - sg[lp] == 0 in value).
        ratio = torch.exp(seq_log_ratio[:, None] + lp - lp.detach())  # [B, T]
    elif cfg.ratio_level == "token":
        seq_log_ratio = None
        ratio = _safe_exp(log_ratio_tok)  # [B, T]
    else:
        raise ValueError(f"unknown ratio_level {cfg.ratio_level!r}")

    # --- clipped surrogate ----------------------------------------------------------------------
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * ratio.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    # Explicit selection instead of torch.maximum: on ties maximum splits the gradient in halves;
    # here a tie takes the unclipped branch, whose gradient is the plain policy gradient.
    clipped = pg_clipped > pg_unclipped  # [B, T]
    per_token = torch.where(clipped, pg_clipped, pg_unclipped) * weight
    per_token = torch.where(keep, per_token, 0.0)  # dropped tokens: 0, but still in denominators
    loss = aggregate(per_token, mask, cfg.loss_agg, loss_norm)

    # --- metrics (detached) ----------------------------------------------------------------------
    with torch.no_grad():
        metrics: dict[str, Tensor] = {}
        metrics["clip_frac"] = _masked_mean(clipped, keep)
        metrics["clip_frac/low"] = _masked_mean(clipped & (adv < 0), keep)
        metrics["clip_frac/high"] = _masked_mean(clipped & (adv > 0), keep)
        if seq_log_ratio is not None:
            stats = _stats(torch.exp(seq_log_ratio), keep.any(dim=-1))
        else:
            stats = _stats(ratio, keep)
        metrics["policy_ratio/mean"], metrics["policy_ratio/max"], metrics["policy_ratio/min"] = stats
        stats = _stats(rho_unit, unit_valid)
        metrics["is_ratio/mean"], metrics["is_ratio/max"], metrics["is_ratio/min"] = stats
        metrics["is_truncated_frac"] = _masked_mean(iw.changed, unit_valid)
        metrics["is_weight/mean"] = _masked_mean(weight, keep)
        metrics["masked_frac"] = _masked_mean(m & ~keep, m)
        d = log_ratio_tok.detach().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        metrics["approx_kl"] = _masked_mean(torch.exp(d) - 1.0 - d, keep)
        metrics["mismatch/logprob_abs"] = _masked_mean((behav - prox).abs(), m)
    return loss, metrics


# --------------------------------------------------------------------------------------------------
# KL, value loss
# --------------------------------------------------------------------------------------------------


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, kind: str) -> Tensor:
    """Per-token estimators of KL(pi || pi_ref) for tokens sampled from pi (Schulman, 2020).

    With d = logprobs - ref_logprobs = log(pi / pi_ref):
        k1 = d                       unbiased, high variance, can be negative;
        k2 = d^2 / 2                 biased, low variance, >= 0;
        k3 = exp(-d) - 1 + d         unbiased, low variance, >= 0 (GRPO's choice).
    For k3, d is clamped to [-20, 20] first (finite values; zero gradient beyond).

    Args:
        logprobs: [B, T] policy logprobs (with grad for a KL loss).
        ref_logprobs: [B, T] reference-model logprobs.
        kind: "k1" | "k2" | "k3".

    Returns:
        [B, T] estimates, unmasked: aggregate them with the loss mask.
    """
    d = logprobs - ref_logprobs
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d.square()
    if kind == "k3":
        d = d.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        return torch.exp(-d) - 1.0 + d
    raise ValueError(f"unknown KL estimator {kind!r}; expected k1, k2 or k3")


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float) -> Tensor:
    """PPO clipped value loss, token mean over the mask.

        v_clip = old + clamp(v - old, -clip, clip)
        loss   = token_mean( 0.5 * max((v - R)^2, (v_clip - R)^2) )

    `clip <= 0` disables clipping (plain 0.5 * squared error).

    Args:
        values: [B, T] critic values with grad.
        old_values: [B, T] values from the critic that produced the returns (no grad).
        returns: [B, T] value targets (e.g. from `gae`).
        mask: [B, T] 1.0 on generated tokens.
        clip: value clip range.

    Returns:
        0-dim loss.
    """
    m = mask != 0
    dt = _dtype(values)
    v = torch.where(m, values.to(dt), 0.0)
    old = torch.where(m, old_values.detach().to(dt), 0.0)
    ret = torch.where(m, returns.detach().to(dt), 0.0)
    err = (v - ret).square()  # [B, T]
    if clip > 0:
        v_clipped = old + (v - old).clamp(-clip, clip)
        err_clipped = (v_clipped - ret).square()
        # Pessimistic of the two, as in PPO; a tie keeps the unclipped gradient.
        err = torch.where(err_clipped > err, err_clipped, err)
    return aggregate(0.5 * err, mask, "token_mean")


# --------------------------------------------------------------------------------------------------
# Logits -> token logprobs, entropy (chunked, with hand-written backward: memory-frugal)
# --------------------------------------------------------------------------------------------------


def _chunks(shape: torch.Size):
    """Yield (b, start, end) covering [B, T] in slabs of at most CHUNK_ELEMENTS logits each."""
    B, T, V = shape
    rows = max(1, CHUNK_ELEMENTS // max(V, 1))
    for b in range(B):
        for s in range(0, T, rows):
            yield b, s, min(s + rows, T)


def _support_threshold(z: Tensor, kept: Tensor | None) -> Tensor | None:
    """The sampling support of each row of `z` [n, V]: the value of its `kept[r]`-th largest logit
    (rows with `kept[r] <= 0` or `>= V` keep the whole vocabulary: -inf). None when no row is
    truncated. Ties at the threshold are kept, as vLLM's top-k keeps them."""
    if kept is None:
        return None
    V = z.shape[-1]
    k = kept.to(torch.long)
    trunc = (k > 0) & (k < V)
    if not bool(trunc.any()):
        return None
    thr = torch.full(k.shape, -torch.inf, dtype=z.dtype, device=z.device)
    rows = trunc.nonzero().squeeze(-1)
    kr = k[rows]
    kmax = int(kr.max())
    if kmax <= V // 4:
        top = z[rows].topk(kmax, dim=-1).values  # [r, kmax], descending
    else:
        top = z[rows].sort(dim=-1, descending=True).values  # [r, V]
    thr[rows] = top.gather(-1, (kr - 1)[:, None]).squeeze(-1)
    return thr


def _apply_support(z: Tensor, thr: Tensor | None, targets: Tensor) -> Tensor:
    """`z` [n, V] with the logits outside each row's support (below `thr` [n]) set to -inf; the target
    token always stays in (a trainer whose logits order the boundary differently from the engine's
    must still give the sampled token a finite logprob)."""
    if thr is None:
        return z
    out = z.masked_fill(z < thr[:, None], -torch.inf)
    return out.scatter(-1, targets[:, None], z.gather(-1, targets[:, None]))


class _TokenLogprobs(torch.autograd.Function):
    """log softmax(logits / tau)[target], without materialising log_softmax over [B, T, V]; with
    `with_entropy`, also the (non-differentiable) entropy from the same pass over the vocabulary.

    Saves only the logits (a reference, no copy), the targets and the logsumexp [B, T]; the backward
    recomputes softmax per chunk: d logp / d z = (onehot(target) - softmax(z / tau)) / tau.
    """

    @staticmethod
    def forward(
        ctx, logits: Tensor, targets: Tensor, temperature: float, with_entropy: bool, kept: Tensor | None
    ) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        cdt = _dtype(logits)
        B, T, _ = logits.shape
        out = torch.empty((B, T), dtype=cdt, device=logits.device)
        lse = torch.empty((B, T), dtype=cdt, device=logits.device)
        ent = torch.empty((B, T) if with_entropy else (0, 0), dtype=cdt, device=logits.device)
        # Per-row support thresholds (-inf: the whole vocabulary), kept for the backward.
        thr_all = None if kept is None else torch.full((B, T), -torch.inf, dtype=cdt, device=logits.device)
        for b, s, e in _chunks(logits.shape):
            z = logits[b, s:e].to(cdt)  # [n, V], a view when possible; upcast per chunk only
            if temperature != 1.0:
                z = z / temperature
            thr = _support_threshold(z, None if kept is None else kept[b, s:e])
            if thr is not None:
                assert thr_all is not None
                thr_all[b, s:e] = thr
                z = _apply_support(z, thr, targets[b, s:e])
            if with_entropy:
                # One pass for both: shift by the max, exponentiate once. H = log S - E_p[z - max]
                # with S = sum exp(z - max); p == 0 where z == -inf, whose 0 * -inf nansum skips.
                top = z.amax(dim=-1, keepdim=True)  # [n, 1]
                shifted = z - top
                ex = shifted.exp()
                total = ex.sum(dim=-1)  # [n]
                log_total = total.log()
                ent[b, s:e] = log_total - (ex * shifted).nansum(dim=-1) / total
                chunk_lse = log_total + top.squeeze(-1)
            else:
                chunk_lse = torch.logsumexp(z, dim=-1)  # [n]
            out[b, s:e] = z.gather(-1, targets[b, s:e, None]).squeeze(-1) - chunk_lse
            lse[b, s:e] = chunk_lse
        ctx.save_for_backward(logits, targets, lse, thr_all if thr_all is not None else lse.new_empty(0))
        ctx.temperature = temperature
        ctx.truncated = thr_all is not None
        ctx.mark_non_differentiable(ent)
        return out, ent

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor, _grad_ent: Tensor) -> tuple[Tensor, None, None, None, None]:  # type: ignore[override]
        logits, targets, lse, thr_all = ctx.saved_tensors
        tau = ctx.temperature
        cdt = lse.dtype
        grad = torch.empty_like(logits)  # [B, T, V] in the logits' dtype
        for b, s, e in _chunks(logits.shape):
            z = logits[b, s:e].to(cdt)
            if tau != 1.0:
                z = z / tau
            if ctx.truncated:  # outside the support: softmax 0, so no gradient there
                z = _apply_support(z, thr_all[b, s:e], targets[b, s:e])
            g = grad_out[b, s:e].to(cdt)  # [n]
            d = torch.exp(z - lse[b, s:e, None]).mul_(-g[:, None])  # -g * softmax
            d.scatter_add_(-1, targets[b, s:e, None], g[:, None])  # + g at the target
            if tau != 1.0:
                d.div_(tau)
            grad[b, s:e] = d.to(grad.dtype)
        return grad, None, None, None, None


def token_logprobs_from_logits(
    logits: Tensor, targets: Tensor, temperature: float = 1.0, kept: Tensor | None = None
) -> Tensor:
    """Logprob of each target token under softmax(logits / temperature).

    Memory-frugal: computes z[target] - logsumexp(z) chunk by chunk (at most CHUNK_ELEMENTS logits
    upcast at a time) and has a hand-written chunked backward, so neither the forward nor autograd
    keeps a [B, T, V] log_softmax or a float32 copy of low-precision logits. Non-contiguous inputs
    (e.g. `logits[:, :-1]`) are read in place, not copied.

    Args:
        logits: [B, T, V] (or [T, V]) model outputs, any float dtype; already aligned so that
            logits[:, t] predicts targets[:, t].
        targets: [B, T] (or [T]) token ids.
        temperature: the sampling temperature the engine used (its logprobs are of the scaled
            distribution), > 0.
        kept: [B, T] (or [T]) the size of the support the engine sampled each token from (top-p /
            top-k: the sampling mask, rollout/engines/vllm.py); the logprob is then of the softmax over
            the `kept` largest logits of this row (and the target), as the engine's was. 0 (or >= V)
            keeps the whole vocabulary. None: no truncation anywhere.

    Returns:
        [B, T] float32 logprobs (float64 for float64 logits), differentiable w.r.t. logits
        (first order).
    """
    if logits.dim() == 2:
        k = None if kept is None else kept[None]
        return token_logprobs_from_logits(logits[None], targets[None], temperature, k)[0]
    _check_logprob_args(logits, targets, temperature, kept)
    return _TokenLogprobs.apply(logits, targets.long(), float(temperature), False, kept)[0]


def _check_logprob_args(
    logits: Tensor, targets: Tensor, temperature: float, kept: Tensor | None = None
) -> None:
    """ValueError unless temperature > 0, logits are [B, T, V] and targets (and kept) [B, T]."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits [B, T, V] and targets [B, T], got {tuple(logits.shape)}, {tuple(targets.shape)}"
        )
    if kept is not None and kept.shape != targets.shape:
        raise ValueError(f"kept must be [B, T] like targets, got {tuple(kept.shape)}, {tuple(targets.shape)}")


def token_logprobs_and_entropy(
    logits: Tensor, targets: Tensor, temperature: float = 1.0, kept: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """`token_logprobs_from_logits` (differentiable) and `entropy_from_logits` (detached) from one
    pass over the vocabulary, for an entropy that is only reported: one exp instead of three. With
    `kept`, both are of the truncated distribution the engine sampled from.

    Args and shapes as `token_logprobs_from_logits`; returns ([B, T] logprobs, [B, T] entropies).
    """
    _check_logprob_args(logits, targets, temperature, kept)
    return _TokenLogprobs.apply(logits, targets.long(), float(temperature), True, kept)


class _Entropy(torch.autograd.Function):
    """H = logsumexp(z) - sum softmax(z) * z per row, chunked, with hand-written backward.

    Rows are shifted by their max first (H is shift-invariant) so large logits lose no precision.
    Saves the logits (reference), the shifted logsumexp and the shifted mean logit E_p[z - max];
    dH/dz_j = -p_j (z_j - E_p[z]).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, logits: Tensor, temperature: float, kept: Tensor | None, targets: Tensor | None
    ) -> Tensor:
        cdt = _dtype(logits)
        B, T, _ = logits.shape
        ent = torch.empty((B, T), dtype=cdt, device=logits.device)
        lse = torch.empty_like(ent)
        mean_z = torch.empty_like(ent)
        thr_all = None if kept is None else torch.full((B, T), -torch.inf, dtype=cdt, device=logits.device)
        for b, s, e in _chunks(logits.shape):
            z = logits[b, s:e].to(cdt)
            if temperature != 1.0:
                z = z / temperature
            thr = _support_threshold(z, None if kept is None else kept[b, s:e])
            if thr is not None:
                assert thr_all is not None and targets is not None
                thr_all[b, s:e] = thr
                z = _apply_support(z, thr, targets[b, s:e])
            z = z - z.amax(dim=-1, keepdim=True)  # [n, V], <= 0
            chunk_lse = torch.logsumexp(z, dim=-1)  # [n]
            p = torch.exp(z - chunk_lse[:, None])
            # p == 0 where z == -inf (banned tokens): 0 * -inf would be nan, the true term is 0.
            ez = torch.where(p > 0, p * z, 0.0).sum(dim=-1)  # [n]
            ent[b, s:e] = chunk_lse - ez
            lse[b, s:e] = chunk_lse
            mean_z[b, s:e] = ez
        empty = lse.new_empty(0)
        ctx.save_for_backward(
            logits, lse, mean_z, empty if thr_all is None else thr_all, empty if targets is None else targets
        )
        ctx.temperature = temperature
        ctx.truncated = thr_all is not None
        return ent

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        logits, lse, mean_z, thr_all, targets = ctx.saved_tensors
        tau = ctx.temperature
        cdt = lse.dtype
        grad = torch.empty_like(logits)
        for b, s, e in _chunks(logits.shape):
            z = logits[b, s:e].to(cdt)
            if tau != 1.0:
                z = z / tau
            if ctx.truncated:
                z = _apply_support(z, thr_all[b, s:e], targets[b, s:e])
            z = z - z.amax(dim=-1, keepdim=True)
            p = torch.exp(z - lse[b, s:e, None])
            d = torch.where(p > 0, p * (z - mean_z[b, s:e, None]), 0.0)
            # dH/dlogits = dH/dz / tau
            grad[b, s:e] = (d * (-grad_out[b, s:e, None].to(cdt) / tau)).to(grad.dtype)
        return grad, None, None, None


def entropy_from_logits(
    logits: Tensor, temperature: float = 1.0, kept: Tensor | None = None, targets: Tensor | None = None
) -> Tensor:
    """Entropy of softmax(logits / temperature) per position, in nats.

    Numerically stable (max-shifted logsumexp; -inf logits allowed) and chunk-friendly: processes
    at most CHUNK_ELEMENTS logits at a time, forward and backward, without keeping a [B, T, V]
    probability tensor for autograd. Differentiable (first order) for an entropy bonus.

    Args:
        logits: [B, T, V] (or [T, V]), any float dtype.
        temperature: the sampling temperature (scaled chunk by chunk; no scaled copy is kept).
        kept, targets: [B, T] the sampling support and the sampled tokens (see
            `token_logprobs_from_logits`): the entropy of the truncated distribution. Both or neither.

    Returns:
        [B, T] float32 entropies (float64 for float64 logits); unmasked, aggregate with the mask.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if (kept is None) != (targets is None):
        raise ValueError("entropy_from_logits: pass kept and targets together")
    if logits.dim() == 2:
        if kept is None or targets is None:
            return entropy_from_logits(logits[None], temperature)[0]
        return entropy_from_logits(logits[None], temperature, kept[None], targets[None])[0]
    if logits.dim() != 3:
        raise ValueError(f"expected logits [B, T, V], got {tuple(logits.shape)}")
    if kept is not None:
        _check_logprob_args(logits, targets, temperature, kept)  # type: ignore[arg-type]
        targets = targets.long()  # type: ignore[union-attr]
    return _Entropy.apply(logits, float(temperature), kept, targets)
