"""Advantage estimators: pure functions of tensors, no model, no state.

Conventions (shared with `trainer.losses`):

- Per-token tensors are [B, T] and aligned with *predicted* tokens: position t belongs to token t+1.
- `mask` [B, T] is 1.0 on tokens the policy generated and 0.0 on prompt, environment and padding tokens.
  Anything non-zero counts as a generated token. Values at masked positions never influence a result
  (not even when they are nan or inf), and outputs are exactly 0 there.
- Sequence-level estimators take rewards shaped [G, n]: G groups (one task each) of n trajectories.

All statistics here are computed without gradient: advantages are constants of the policy loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from slime.core.config import AlgorithmConfig

# Added to standard deviations before dividing, so that a group whose rewards do not vary gets
# advantage 0 instead of nan.
STD_EPS = 1e-6


def _std(x: Tensor, dim: int | None = None) -> Tensor:
    """Unbiased (Bessel-corrected) std over `dim` (keepdim) or over all of x; 0 with fewer than 2 values."""
    n = x.numel() if dim is None else x.shape[dim]
    if n < 2:  # torch would return nan (and warn) for a single value
        return x.new_zeros(()) if dim is None else torch.zeros_like(x.narrow(dim, 0, 1))
    return x.std(correction=1) if dim is None else x.std(dim=dim, keepdim=True, correction=1)


@torch.no_grad()
def sequence_advantages(rewards: Tensor, cfg: AlgorithmConfig) -> Tensor:
    """Per-trajectory advantages from group rewards.

    Args:
        rewards: [G, n] scalar reward of each trajectory, n trajectories per group (task).
        cfg: the algorithm section; `cfg.advantage` selects the estimator:

            - "grpo":   (r - mean_group) / (std_group + eps) when `cfg.normalize_adv_std`,
                        else r - mean_group (DeepSeekMath GRPO).
            - "dr_grpo": r - mean_group, never divided by the std (Dr. GRPO removes that bias).
            - "rloo":   r - mean of the *other* n-1 rewards = n/(n-1) * (r - mean_group).
            - "reinforce_pp": REINFORCE++-baseline: r - mean_group, then divided by the std of those
                        centred values over the whole batch (all G*n), + eps.

            std is the unbiased (n-1) estimate, as in the GRPO/TRL/verl reference implementations.

    Returns:
        [G, n] float advantages (float32 unless rewards are float64). A group whose rewards are all
        equal gets 0 (no signal), never nan.

    Raises:
        ValueError: for `cfg.advantage == "gae"` (token-level: use `gae`) or an unknown estimator, or
        for "rloo" with n < 2.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [G, n], got shape {tuple(rewards.shape)}")
    r = rewards.double() if rewards.dtype == torch.float64 else rewards.float()
    n = r.shape[1]
    # A group of equal rewards is centred to exactly 0: its float mean can be one ulp off the value
    # (0.1 repeated 3 times), and the std division (std ~ 1 ulp, + eps) would blow that up to a
    # systematic advantage of ~0.06 for every trajectory of a group that carries no signal.
    flat = (r == r[:, :1]).all(dim=1, keepdim=True)  # [G, 1]
    centred = torch.where(flat, 0.0, r - r.mean(dim=1, keepdim=True))  # [G, n]
    kind = cfg.advantage
    if kind == "grpo":
        if cfg.normalize_adv_std:
            return centred / (_std(r, dim=1) + STD_EPS)
        return centred
    if kind == "dr_grpo":
        return centred
    if kind == "rloo":
        if n < 2:
            raise ValueError("rloo needs at least 2 trajectories per group")
        # r_i - (sum_j r_j - r_i)/(n-1) == n/(n-1) * (r_i - mean): the leave-one-out baseline.
        return centred * (n / (n - 1))
    if kind == "reinforce_pp":
        # The batch mean of the centred values is 0 by construction, so only the scale is normalised.
        return centred / (_std(centred) + STD_EPS)
    if kind == "gae":
        raise ValueError("advantage=gae is token-level: call trainer.advantages.gae() with a critic's values")
    raise ValueError(f"unknown advantage estimator {kind!r}")


@torch.no_grad()
def overlong_shaping(lengths: Tensor, max_len: int, buffer: int, penalty: float) -> Tensor:
    """DAPO soft overlong punishment, to be *added* to each trajectory's reward.

    With L = length, L_max = max_len and L_cache = buffer:

        0                                    if L <= L_max - L_cache
        (L_max - L_cache - L) / L_cache * p  if L_max - L_cache < L <= L_max   (linear ramp 0 .. -p)
        -p                                   if L > L_max

    Args:
        lengths: [N] response lengths in tokens (generated tokens only).
        max_len: L_max, the length at which the full penalty applies.
        buffer: L_cache, tokens before `max_len` where the ramp starts. With buffer = 0 only lengths
            above `max_len` are punished; when `max_len` is the generation cap that never happens,
            so buffer = 0 switches shaping off.
        penalty: p >= 0, the penalty magnitude at and beyond the limit.

    Returns:
        [N] float32 shaping terms, all <= 0.
    """
    length = lengths.float()
    out = torch.zeros_like(length)
    if buffer > 0:
        start = max_len - buffer
        ramp = (start - length) / buffer * penalty
        out = torch.where((length > start) & (length <= max_len), ramp, out)
    return torch.where(length > max_len, torch.full_like(length, -penalty), out)


@torch.no_grad()
def gae(
    token_rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over generated tokens only.

    Each generated token (mask != 0) is one action. Masked positions are not time steps:

    - Environment/tool tokens inside a multi-turn sequence are observations, not actions, so the
      recursion *skips* them: the successor state of the action at t is the next generated position
      t' > t (its value V[t'] bootstraps delta_t), and gamma / lambda are applied once per action,
      not once per raw position. So an episode's discounting does not depend on how many tokens the
      environment happened to append.
    - Rewards and values at masked positions are ignored. Put each reward on a generated token
      (the outcome reward on the last generated token; a per-turn reward on that turn's last token).
    - After the last action the value is 0 (the episode ended or was truncated; to bootstrap a
      truncated episode add gamma * V(s_end) to its last reward).

        delta_t = r_t + gamma * V[next(t)] - V[t]
        A_t     = delta_t + gamma * lam * A[next(t)]
        R_t     = A_t + V[t]                       (the value target)

    Args:
        token_rewards: [B, T] reward per predicted position.
        values: [B, T] critic values V(s_t) at each predicted position (detached here).
        mask: [B, T] 1.0 on generated tokens.
        gamma: discount per action.
        lam: GAE lambda.

    Returns:
        (advantages [B, T], returns [B, T]), float32 (float64 for float64 values), 0 where mask is 0.
    """
    if not (token_rewards.shape == values.shape == mask.shape) or values.dim() != 2:
        raise ValueError(
            f"gae expects [B, T] tensors of one shape, got {tuple(token_rewards.shape)}, "
            f"{tuple(values.shape)}, {tuple(mask.shape)}"
        )
    dtype = torch.float64 if values.dtype == torch.float64 else torch.float32
    m = mask != 0  # [B, T] bool
    # Zero masked entries first so nan/inf there cannot leak through arithmetic.
    r = torch.where(m, token_rewards.to(dtype), 0.0)
    v = torch.where(m, values.detach().to(dtype), 0.0)
    B, T = v.shape
    adv = torch.zeros_like(v)
    next_value = v.new_zeros(B)  # V of the next action's state, per row
    next_adv = v.new_zeros(B)  # A of the next action, per row
    # A backward scan over positions; T is the sequence length (hundreds to thousands), and each step
    # is a [B] vector op, so this is cheap next to a forward pass.
    for t in range(T - 1, -1, -1):
        mt = m[:, t]
        a_t = r[:, t] + gamma * next_value - v[:, t] + gamma * lam * next_adv
        adv[:, t] = torch.where(mt, a_t, 0.0)
        # Carry the successor state across masked positions unchanged (they are skipped).
        next_value = torch.where(mt, v[:, t], next_value)
        next_adv = torch.where(mt, a_t, next_adv)
    returns = torch.where(m, adv + v, 0.0)
    return adv, returns


def broadcast_to_tokens(seq_adv: Tensor, mask: Tensor) -> Tensor:
    """Give every generated token its trajectory's advantage.

    Args:
        seq_adv: [B] one advantage per sequence (flatten [G, n] advantages to [G*n] first).
        mask: [B, T] 1.0 on generated tokens.

    Returns:
        [B, T] with seq_adv[b] where mask[b, t] != 0 and exactly 0 elsewhere.
    """
    if seq_adv.dim() != 1 or seq_adv.shape[0] != mask.shape[0]:
        raise ValueError(f"seq_adv must be [B]={mask.shape[0]}, got {tuple(seq_adv.shape)}")
    return torch.where(mask != 0, seq_adv[:, None].to(torch.promote_types(seq_adv.dtype, torch.float32)), 0.0)


@dataclass(frozen=True)
class Moments:
    """Count, sum and sum of squares of the masked entries of one or more tensors (float64 sums).

    Moments of separate pieces add up (`+`, or element-wise after an all-reduce), so `whiten` can
    normalise each micro-batch of a batch with the statistics of the whole batch, across ranks.
    """

    count: float = 0.0
    total: float = 0.0
    total_sq: float = 0.0

    @staticmethod
    @torch.no_grad()
    def of(x: Tensor, mask: Tensor) -> Moments:
        m = mask != 0
        xv = torch.where(m, x.double(), 0.0)
        return Moments(float(m.sum()), float(xv.sum()), float(xv.square().sum()))

    def __add__(self, other: Moments) -> Moments:
        return Moments(self.count + other.count, self.total + other.total, self.total_sq + other.total_sq)

    @property
    def mean(self) -> float:
        return self.total / max(self.count, 1.0)

    @property
    def var(self) -> float:
        """Unbiased variance; 0 with fewer than two entries."""
        if self.count < 2:
            return 0.0
        return max(self.total_sq - self.count * self.mean**2, 0.0) / (self.count - 1.0)


@torch.no_grad()
def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, moments: Moments | None = None) -> Tensor:
    """Normalise x over the masked entries of the whole batch (PPO advantage whitening).

    mean and unbiased variance are taken over entries where mask != 0 (or, when `moments` is given,
    are those of the batch x is one piece of: e.g. the all-reduced `Moments` of every micro-batch);
    result = (x - mean) / sqrt(var + 1e-8), plus `mean` again when shift_mean is False
    (scale only, keeping the sign structure of e.g. returns).

    Args:
        x: [B, T] values.
        mask: [B, T] 1.0 where x counts.
        shift_mean: subtract the mean (True) or only rescale (False).
        moments: the statistics to normalise with (default: those of x over mask).

    Returns:
        [B, T] float, 0 where mask is 0. With fewer than two masked entries the variance is taken as 0.
    """
    m = mask != 0
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    xv = torch.where(m, x.to(dtype), 0.0)
    if moments is None:
        n = m.sum()
        mean = xv.sum() / n.clamp(min=1)
        sq = torch.where(m, (xv - mean) ** 2, 0.0).sum()
        var = torch.where(n > 1, sq / (n - 1).clamp(min=1), torch.zeros_like(sq))
    else:
        mean = torch.tensor(moments.mean, dtype=dtype, device=x.device)
        var = torch.tensor(moments.var, dtype=dtype, device=x.device)
    out = (xv - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return torch.where(m, out, 0.0)


def distill_advantages(
    adv: Tensor, teacher: Tensor, student: Tensor, mask: Tensor, coef: float, env_coef: float
) -> Tensor:
    """On-policy distillation (Agarwal et al. 2024; Thinking Machines 2025): the per-token reverse KL
    estimate log p_teacher(y_t) - log p_student(y_t) of the student's own token as its advantage,
    beside the environment's:

        A'_t = env_coef * A_t + coef * (teacher_t - student_t)      on loss tokens, 0 elsewhere.

    Its expectation under the student's sampling is -KL(student || teacher) per token, so the policy
    gradient with it descends the reverse KL. `student` is the behaviour logprob (what the student
    sampled with, at the rollout temperature); tokens whose `teacher` is nan (a sequence the teacher
    did not score) get the environment's term only.

    Args:
        adv: [B, T] the environment's advantages per token.
        teacher, student: [B, T] logprobs of the sampled tokens.
        mask: [B, T] loss tokens.
    """
    if not adv.shape == teacher.shape == student.shape == mask.shape:
        raise ValueError(
            f"distill_advantages expects [B, T] tensors of one shape, got "
            f"{[tuple(t.shape) for t in (adv, teacher, student, mask)]}"
        )
    m = mask != 0
    scored = m & ~torch.isnan(teacher)
    rkl = torch.where(scored, teacher - student, 0.0)
    return torch.where(m, env_coef * adv + coef * rkl, 0.0)
