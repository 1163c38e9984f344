"""The objective of one train step: rewards, advantages, loss normalisers and the micro-step loss.

Tensors in, tensors out: nothing here builds a model or needs DeepSpeed; collectives go through a
`trainer.process.Collectives` (identities for one rank), so all of it runs in unit tests
(tests/test_objective.py). The rank's step (trainer/train_step.py) runs the forwards and the backward.

Decisions:

- Loss normalisation: the loss of one optimizer step is the `algorithm.loss_agg` aggregate over the
  *global* minibatch (all ranks, all micro-batches). `policy_loss` normalises within a micro-batch,
  so micro-batch k's loss is weighted by n_k / N (`Normalisers.policy_weight`), where n is the number
  of loss tokens (token_mean) or of non-empty sequences (seq_mean, seq_sum_norm) and N its
  all-reduced total over the minibatch; the rank further multiplies by the world size because
  DeepSpeed averages gradients over data-parallel ranks. The seq_sum_norm constant is
  `max_response_len` when given, else the longest predicted length of the global batch.
- Proximal logprobs: recomputed with the current weights before the first update when more than one
  optimizer step uses a batch (ppo_epochs * num_minibatches > 1) or when the KL penalty goes into the
  reward (`needs_proximal`); otherwise they equal the detached logprobs of the training forward itself
  (same weights), which saves one forward pass per step.
- Advantages of sequence-level estimators are computed from the rewards of the *global* batch
  (all-gathered), so batch statistics (REINFORCE++) do not depend on the number of ranks.
- KL to the reference: kl_mode=loss adds kl_coef * aggregate(KL) to the loss; kl_mode=reward subtracts
  kl_coef * KL(proximal || reference) from the rewards (summed over a sequence's tokens for
  sequence-level estimators, per token for GAE).
- Zero advantages (`skips_zero_advantage`): with sequence-level advantages, no KL term, no entropy
  bonus and no router losses, every term of a sequence's loss is its advantage times something
  finite (trainer/losses.py `policy_loss`), so a sequence whose advantage is exactly 0 (every
  sequence of a GRPO group whose rewards are all equal) has loss 0 and gradient 0. The rank leaves
  it out of the forward and backward; it still counts in the normalisers, the advantage moments and
  the loss-token count (`StepCounts.of(..., skipped=...)`), so the update is the one the full batch
  gives, up to floating-point summation order. Per-token metrics (entropy, ratios, mismatch) then
  cover the trained sequences.
- Critic (advantage=gae): the outcome reward sits on each sequence's last generated token; advantages
  are whitened over the global batch (`whiten` with all-reduced `Moments`) when
  algorithm.normalize_adv_std.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from slime.core.config import AlgorithmConfig
from slime.core.types import Group
from trainer.advantages import (
    Moments,
    broadcast_to_tokens,
    distill_advantages,
    gae,
    overlong_shaping,
    sequence_advantages,
    whiten,
)
from trainer.batching import MicroBatch, SeqRef
from trainer.importance import (
    behavior_train_logprobs,
    fallback_gap,
    importance_weights,
    offpolicy_stats,
)
from trainer.losses import (
    aggregate,
    entropy_from_logits,
    kl_estimate,
    policy_loss,
    token_logprobs_and_entropy,
    token_logprobs_from_logits,
)
from trainer.packing import Packed
from trainer.process import Collectives
from trainer.step_metrics import StepMetrics


@dataclass
class Scored:
    """One micro-batch and what scoring and the advantage computation attach to it.
    All per-token tensors are [B, T] (T = L-1-start, see trainer.batching) on the model's device."""

    mb: MicroBatch
    prox: Tensor | None = None  # proximal logprobs (None: take them from the training forward)
    ref: Tensor | None = None  # reference-model logprobs
    old_values: Tensor | None = None  # critic values before the update
    adv: Tensor | None = None  # per-token advantages
    returns: Tensor | None = None  # value targets (GAE)
    # The trainer's logprob of each stale token under its own version's weights (pi_v, from a kept
    # snapshot) where `beh_known`; None without snapshots (trainer/importance.py).
    beh: Tensor | None = None
    beh_known: Tensor | None = None
    version: int | None = None  # the policy version being trained (token staleness = version - its own)
    # Sums over the micro-batch's loss tokens of the applied importance weight and of its square, and
    # the token count (the ESS step control of trainer/train_step.py), set by `micro_step_loss`.
    is_sums: tuple[float, float, float] = (0.0, 0.0, 0.0)


# Minibatches (one optimizer step each) of micro-batches (one forward/backward each).
Plan = list[list[Scored]]


def needs_proximal(algo: AlgorithmConfig) -> bool:
    """Whether proximal logprobs must be scored before the first update (see the module docstring)."""
    updates = algo.ppo_epochs * algo.num_minibatches
    return updates > 1 or (algo.kl_coef > 0 and algo.kl_mode == "reward")


def skips_zero_advantage(algo: AlgorithmConfig, router_losses: bool, max_response_len: int) -> bool:
    """Whether sequences whose advantage is exactly 0 can stay out of the forward and backward without
    changing the update (see the module docstring). seq_sum_norm must then have its constant from
    `max_response_len`: the fallback, the widest trained sequence, would depend on what was left out."""
    return (
        algo.advantage != "gae"
        and not algo.distill.teacher  # the teacher's per-token term does not vanish with A
        and algo.kl_coef == 0
        and algo.entropy_coef == 0
        and not router_losses
        and (algo.loss_agg != "seq_sum_norm" or max_response_len > 0)
    )


def zero_advantage_indices(seq_adv: Tensor) -> set[int]:
    """Indices into the flattened batch of the sequences whose advantage [N] is exactly 0."""
    return {int(i) for i in (seq_adv == 0).nonzero().flatten()}


def units(mb: MicroBatch, loss_agg: str) -> float:
    """This micro-batch's count of the aggregation's units: loss tokens (token_mean) or sequences
    with at least one loss token (seq_mean, seq_sum_norm); 0 for a dummy."""
    if mb.dummy:
        return 0.0
    if loss_agg == "token_mean":
        return float(mb.num_loss_tokens)
    return float((mb.loss_mask.sum(dim=-1) > 0).sum())


# --------------------------------------------------------------------------------------------------
# Rewards and advantages
# --------------------------------------------------------------------------------------------------


def shaped_rewards(refs: list[SeqRef], plan: Plan, algo: AlgorithmConfig, max_response_len: int) -> Tensor:
    """Per-sequence rewards [N_local] after DAPO overlong shaping and, for sequence-level estimators
    with kl_mode=reward, the summed per-token KL penalty (needs `prox` and `ref` scored)."""
    rewards = torch.tensor([r.traj.reward for r in refs], dtype=torch.float32)
    if algo.overlong_buffer > 0:
        lengths = torch.tensor([r.traj.num_generated for r in refs], dtype=torch.int64)
        rewards = rewards + overlong_shaping(
            lengths, max_response_len, algo.overlong_buffer, algo.overlong_penalty
        )
    if algo.kl_coef > 0 and algo.kl_mode == "reward" and algo.advantage != "gae":
        for w in (w for mini in plan for w in mini if not w.mb.dummy):
            kl = kl_estimate(w.prox, w.ref, algo.kl_estimator) * w.mb.loss_mask  # [B, T]
            rewards[w.mb.seq_index] -= algo.kl_coef * kl.sum(dim=-1).cpu()
    return rewards


def episodes_of(groups: list[Group]) -> tuple[list[int], Tensor]:
    """The episodes of this rank's groups: how many each group has, and for every sequence (in
    flattened order) the index of its episode among all of them. Segments of one episode (the same
    non-empty `episode_id`, rollout/episode.py) share an index; any other sequence is its own."""
    sizes: list[int] = []
    owner: list[int] = []
    for group in groups:
        seen: dict[str, int] = {}
        for traj in group.trajectories:
            key = traj.episode_id or f"#{len(owner)}"
            if key not in seen:
                seen[key] = sum(sizes) + len(seen)
            owner.append(seen[key])
        sizes.append(len(seen))
    return sizes, torch.tensor(owner, dtype=torch.int64)


def episode_rewards(rewards: Tensor, base: Tensor, owner: Tensor, num_episodes: int) -> Tensor:
    """[E] one reward per episode from per-sequence `rewards` [N] (shaped) and `base` [N] (the
    environment's reward, the same for every segment of an episode): the base once, plus every
    segment's shaping (overlong penalty, KL as reward)."""
    out = torch.zeros(num_episodes, dtype=rewards.dtype)
    out.index_add_(0, owner, rewards - base)
    first = torch.full((num_episodes,), -1, dtype=torch.int64)
    for i, e in enumerate(owner.tolist()):  # each episode's first sequence carries its base reward
        if first[e] < 0:
            first[e] = i
    return out + base[first]


def global_sequence_advantages(
    group_sizes: list[int], rewards: Tensor, algo: AlgorithmConfig, comm: Collectives
) -> Tensor:
    """Advantages [N_local] of this rank's sequences, computed from the rewards of the *global*
    batch (every rank's groups, all-gathered), so batch-level normalisation (REINFORCE++) is the same
    for any number of ranks. `rewards` [N_local] are this rank's, group by group (`group_sizes`).
    Groups of unequal size are computed per size (a batch statistic such as REINFORCE++'s std is then
    per size bucket)."""
    bounds = [sum(group_sizes[:i]) for i in range(len(group_sizes) + 1)]
    local = [rewards[bounds[i] : bounds[i + 1]].tolist() for i in range(len(group_sizes))]
    gathered = comm.all_gather_object(local)
    all_groups = [g for rank_groups in gathered for g in rank_groups]
    offset = sum(len(rank_groups) for rank_groups in gathered[: comm.rank])
    adv_groups: list[Tensor | None] = [None] * len(all_groups)
    by_size: dict[int, list[int]] = {}
    for i, g in enumerate(all_groups):
        by_size.setdefault(len(g), []).append(i)
    for idx in by_size.values():
        adv = sequence_advantages(torch.tensor([all_groups[i] for i in idx], dtype=torch.float32), algo)
        for row, i in enumerate(idx):
            adv_groups[i] = adv[row]
    mine = adv_groups[offset : offset + len(group_sizes)]
    return torch.cat([a for a in mine if a is not None]) if mine else torch.zeros(0)


def sequence_advantages_of_episodes(
    groups: list[Group], refs: list[SeqRef], rewards: Tensor, algo: AlgorithmConfig, comm: Collectives
) -> Tensor:
    """[N_local] advantages of this rank's sequences: computed per episode (a group's baseline counts
    each episode once, however many segments it was split into) and given to each of its segments."""
    sizes, owner = episodes_of(groups)
    base = torch.tensor([r.traj.reward for r in refs], dtype=rewards.dtype)
    ep_adv = global_sequence_advantages(sizes, episode_rewards(rewards, base, owner, sum(sizes)), algo, comm)
    return ep_adv[owner] if len(owner) else ep_adv


def assign_sequence_advantages(plan: Plan, seq_adv: Tensor) -> None:
    """Sequence-level estimators: every generated token gets its sequence's advantage (`w.adv`) from
    `seq_adv` [N_local] (`global_sequence_advantages`)."""
    for w in (w for mini in plan for w in mini):
        w.adv = broadcast_to_tokens(seq_adv[w.mb.seq_index].to(w.mb.loss_mask.device), w.mb.loss_mask)


def add_distillation(plan: Plan, algo: AlgorithmConfig) -> None:
    """algorithm.distill: every micro-batch's advantages become env_coef * A + coef * (teacher -
    student) per token (trainer/advantages.py `distill_advantages`)."""
    d = algo.distill
    for w in (w for mini in plan for w in mini):
        if w.mb.teacher_logprobs is None or w.adv is None:
            if w.adv is not None and not w.mb.dummy:
                w.adv = w.adv * d.env_coef  # no sequence of it was scored: the environment's term only
            continue
        w.adv = distill_advantages(
            w.adv, w.mb.teacher_logprobs, w.mb.behavior_logprobs, w.mb.loss_mask, d.coef, d.env_coef
        )


def token_rewards(w: Scored, rewards: Tensor, algo: AlgorithmConfig) -> Tensor:
    """[B, T] per-token rewards for GAE: each sequence's outcome reward on its last generated token,
    minus kl_coef * KL(proximal || reference) per token with kl_mode=reward."""
    mask = w.mb.loss_mask
    out = torch.zeros_like(mask)  # [B, T]
    if not w.mb.dummy:
        pos = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last = torch.where(mask > 0, pos, -1).amax(dim=1)  # [B]
        has = last >= 0
        seq_r = rewards[w.mb.seq_index].to(mask.device)
        out[has.nonzero().squeeze(-1), last[has]] = seq_r[has]
    if algo.kl_coef > 0 and algo.kl_mode == "reward":
        out = out - algo.kl_coef * kl_estimate(w.prox, w.ref, algo.kl_estimator) * mask
    return out


def assign_gae_advantages(plan: Plan, rewards: Tensor, algo: AlgorithmConfig, comm: Collectives) -> None:
    """Token-level advantages and returns from the critic's `old_values` (`w.adv`, `w.returns`);
    with `normalize_adv_std` the advantages are whitened over the generated tokens of the global
    batch."""
    works = [w for mini in plan for w in mini]
    local = Moments()
    for w in works:
        w.adv, w.returns = gae(
            token_rewards(w, rewards, algo), w.old_values, w.mb.loss_mask, algo.gamma, algo.lam
        )
        local = local + Moments.of(w.adv, w.mb.loss_mask)
    if not algo.normalize_adv_std:
        return
    batch = Moments(*comm.all_reduce([local.count, local.total, local.total_sq]))
    for w in works:
        w.adv = whiten(w.adv, w.mb.loss_mask, moments=batch)


# --------------------------------------------------------------------------------------------------
# Normalisers
# --------------------------------------------------------------------------------------------------


@dataclass
class StepCounts:
    """Sums over one rank's batch that the step needs over all ranks; `all_reduce` sums every field
    over the ranks in one collective."""

    units: list[float]  # per minibatch: aggregation units (see `units`)
    loss_tokens: list[float]  # per minibatch: loss tokens
    adv: Moments  # advantages over loss tokens (for the adv/mean and adv/std metrics)
    tokens: float  # real tokens the forward and backward ran over, prompts included
    sequences: float  # sequences (dummies excluded), skipped ones included
    skipped_sequences: float = 0.0  # zero-advantage sequences left out of the forward and backward
    skipped_tokens: float = 0.0  # their real tokens

    @staticmethod
    def of(
        plan: Plan, loss_agg: str, skipped: list[list[SeqRef]] | None = None, max_len: int | None = None
    ) -> StepCounts:
        """The counts of `plan` plus, per minibatch, the `skipped` zero-advantage sequences (cut to
        `max_len` tokens as the micro-batches cut them): they count as aggregation units, loss tokens
        and (zero) advantages, so normalisers and advantage metrics equal the full batch's."""
        skipped = skipped or [[] for _ in plan]
        works = [w for mini in plan for w in mini]
        adv = Moments()
        for w in works:
            adv = adv + Moments.of(w.adv, w.mb.loss_mask)
        skipped_loss = [[float(loss_tokens(r, max_len)) for r in mini] for mini in skipped]
        adv = adv + Moments(count=sum(map(sum, skipped_loss)), total=0.0, total_sq=0.0)

        def skipped_units(mini: list[float]) -> float:
            return sum(mini) if loss_agg == "token_mean" else float(sum(n > 0 for n in mini))

        return StepCounts(
            units=[
                sum(units(w.mb, loss_agg) for w in mini) + skipped_units(sk)
                for mini, sk in zip(plan, skipped_loss, strict=True)
            ],
            loss_tokens=[
                sum(float(w.mb.num_loss_tokens) for w in mini) + sum(sk)
                for mini, sk in zip(plan, skipped_loss, strict=True)
            ],
            adv=adv,
            tokens=sum(float(w.mb.num_tokens) for w in works),
            sequences=sum(0.0 if w.mb.dummy else float(w.mb.input_ids.shape[0]) for w in works)
            + sum(len(mini) for mini in skipped),
            skipped_sequences=float(sum(len(mini) for mini in skipped)),
            skipped_tokens=float(sum(_cut(r, max_len) for mini in skipped for r in mini)),
        )

    def all_reduce(self, comm: Collectives) -> StepCounts:
        n = len(self.units)
        adv = [self.adv.count, self.adv.total, self.adv.total_sq]
        rest = [self.tokens, self.sequences, self.skipped_sequences, self.skipped_tokens]
        summed = iter(comm.all_reduce([*self.units, *self.loss_tokens, *adv, *rest]))

        def take(k: int) -> list[float]:
            return [next(summed) for _ in range(k)]

        units_, loss_tokens_, moments = take(n), take(n), Moments(*take(3))
        tokens, sequences, skipped_sequences, skipped_tokens = take(4)
        return StepCounts(units_, loss_tokens_, moments, tokens, sequences, skipped_sequences, skipped_tokens)


def _cut(ref: SeqRef, max_len: int | None) -> int:
    """The sequence's length as the micro-batches take it (cut to `max_len` tokens)."""
    n = len(ref.traj.token_ids)
    return n if max_len is None else min(n, max_len)


def loss_tokens(ref: SeqRef, max_len: int | None = None) -> int:
    """The sequence's loss tokens as a micro-batch counts them: generated tokens after the first
    token (never predicted), within the first `max_len` tokens."""
    return int(sum(ref.traj.loss_mask[1 : _cut(ref, max_len)]))


@dataclass
class Normalisers:
    """What turns a micro-batch's own loss into its share of its minibatch's global loss."""

    units: list[float]  # per minibatch: aggregation units over all ranks
    loss_tokens: list[float]  # per minibatch: loss tokens over all ranks (the value loss's token mean)
    loss_norm: float  # the seq_sum_norm constant

    def policy_weight(self, minibatch: int, mb: MicroBatch, loss_agg: str) -> float:
        """n_k / N for the policy loss (see the module docstring)."""
        return units(mb, loss_agg) / max(self.units[minibatch], 1.0)

    def value_weight(self, minibatch: int, mb: MicroBatch) -> float:
        """The micro-batch's share of its minibatch's loss tokens (the value loss is a token mean)."""
        return float(mb.num_loss_tokens) / max(self.loss_tokens[minibatch], 1.0)


def normalisers(counts: StepCounts, plan: Plan, max_response_len: int, comm: Collectives) -> Normalisers:
    """Normalisers from the global `counts`; without `max_response_len` the seq_sum_norm constant is
    the widest untrimmed predicted length of the global batch (a collective)."""
    if max_response_len:
        loss_norm = float(max_response_len)
    else:
        widest = max(w.mb.input_ids.shape[1] - 1 for mini in plan for w in mini)
        loss_norm = comm.all_reduce([float(widest)], "max")[0]
    return Normalisers(units=counts.units, loss_tokens=counts.loss_tokens, loss_norm=loss_norm)


# --------------------------------------------------------------------------------------------------
# The micro-step loss
# --------------------------------------------------------------------------------------------------

_MEAN_KEYS = (
    "clip_frac",
    "clip_frac/low",
    "clip_frac/high",
    "is_ratio/mean",
    "policy_ratio/mean",
    "is_weight/mean",
    "is_truncated_frac",
    "masked_frac",
    "approx_kl",
)


def micro_step_loss(
    logits: Tensor,
    w: Scored,
    algo: AlgorithmConfig,
    temperature: float,
    loss_norm: float,
    weight: float,
    m: StepMetrics,
    layout: Packed | None = None,
) -> tuple[Tensor, Tensor]:
    """The policy objective of one micro-batch from its logits [B, T, V], or [1, K, V] of a packed
    forward with its `layout` (trainer.packing: per-token values go back into [B, T]).

    Returns (total, policy): `total` is what to backpropagate before weighting (policy loss, minus
    the entropy bonus, plus the KL loss with kl_mode=loss), `policy` the policy loss alone (detached),
    both normalised within the micro-batch. `weight` is the micro-batch's share of the minibatch
    (`Normalisers.policy_weight`), used for the reported KL loss. Without proximal logprobs
    (`w.prox` None) the detached logprobs of this forward become them. Records the metrics in `m`.
    """
    mb = w.mb
    n_tok = float(mb.num_loss_tokens)
    rows = (lambda x: x) if layout is None else layout.to_rows
    targets = mb.targets if layout is None else layout.kept(mb.targets)
    # The sampling mask: each token scored under the truncation it was sampled from.
    kept = mb.kept if layout is None or mb.kept is None else layout.kept(mb.kept)
    if algo.entropy_coef > 0:
        lp = rows(token_logprobs_from_logits(logits, targets, temperature, kept))  # [B, T] float32
        # [B, T], with grad for the bonus
        ent = rows(entropy_from_logits(logits, temperature, kept, None if kept is None else targets))
    else:  # the entropy is only reported: from the logprobs' pass over the vocabulary
        lp, ent = (rows(x) for x in token_logprobs_and_entropy(logits, targets, temperature, kept))
    if w.prox is None:
        # Single update per batch: the proximal policy is the current one (same weights).
        w.prox = lp.detach()
        m.mean("mismatch/logprob_abs", masked_abs_mean(mb.behavior_logprobs, w.prox, mb.loss_mask), n_tok)
    beh, staleness = behavior_train(w)
    loss, pm = policy_loss(lp, w.prox, mb.behavior_logprobs, w.adv, mb.loss_mask, algo, loss_norm, beh)
    record_offpolicy(w, beh, staleness, algo, m)
    total = loss
    if algo.entropy_coef > 0:
        total = total - algo.entropy_coef * aggregate(ent, mb.loss_mask, algo.loss_agg, loss_norm)
    if w.ref is not None:
        kl_tok = kl_estimate(lp, w.ref, algo.kl_estimator)  # [B, T]
        if algo.kl_mode == "loss":
            kl_loss = aggregate(kl_tok, mb.loss_mask, algo.loss_agg, loss_norm)
            total = total + algo.kl_coef * kl_loss
            # Weighted by the micro-batch's share: the reduced mean is the global KL loss per step.
            m.mean("loss/kl", float(kl_loss.detach()), weight)
        m.mean("kl", masked_mean(kl_tok, mb.loss_mask), n_tok)
    m.mean("entropy", masked_mean(ent, mb.loss_mask), n_tok)
    if algo.distill.teacher:
        # Reverse KL estimate per token, log student - log teacher, over the scored tokens.
        teacher = mb.teacher_logprobs
        scored = (mb.loss_mask != 0) & ~torch.isnan(teacher) if teacher is not None else mb.loss_mask < 0
        n_scored = float(scored.sum())
        rkl = (
            masked_mean(mb.behavior_logprobs - torch.nan_to_num(teacher), scored)
            if teacher is not None
            else 0.0
        )
        m.mean("distill/reverse_kl", rkl, n_scored)
    for key in _MEAN_KEYS:
        m.mean(key, float(pm[key]), n_tok)
    # Always recorded (the reduce needs the same keys on every rank); a micro-batch without loss
    # tokens contributes the neutral element.
    for key in ("is_ratio/max", "policy_ratio/max"):
        m.max(key, float(pm[key]) if n_tok > 0 else -math.inf)
    for key in ("is_ratio/min", "policy_ratio/min"):
        m.min(key, float(pm[key]) if n_tok > 0 else math.inf)
    return total, loss.detach()


def behavior_train(w: Scored) -> tuple[Tensor, Tensor | None]:
    """pi_v per token (trainer/importance.py `behavior_train_logprobs`) and each token's staleness in
    versions ([B, T]; None when the version being trained is not known: every token counts as fresh)."""
    mb = w.mb
    assert w.prox is not None
    if w.version is None or mb.versions is None:
        return w.prox, None
    staleness = (w.version - mb.versions).clamp(min=0)
    fresh = staleness == 0
    return behavior_train_logprobs(w.prox, mb.behavior_logprobs, w.beh, w.beh_known, fresh), staleness


def record_offpolicy(
    w: Scored, beh: Tensor, staleness: Tensor | None, algo: AlgorithmConfig, m: StepMetrics
) -> None:
    """The off-policy statistics of one micro-batch (trainer/importance.py `offpolicy_stats`, and
    `fallback_gap` where snapshots gave exact pi_v for stale tokens) into `m`; the applied weights'
    sums into `w.is_sums` for the ESS step control."""
    mb = w.mb
    assert w.prox is not None
    with torch.no_grad():
        iw = importance_weights(w.prox, mb.behavior_logprobs, beh, mb.loss_mask, algo)
        for key, (value, weight) in offpolicy_stats(
            w.prox, mb.behavior_logprobs, beh, iw, mb.loss_mask, staleness
        ).items():
            m.mean(key, value, weight)
        if w.beh_known is not None and staleness is not None:
            stale = (staleness > 0) & (mb.loss_mask != 0)
            known = w.beh_known & stale
            for key, (value, weight) in fallback_gap(w.prox, mb.behavior_logprobs, beh, known, algo).items():
                m.mean(key, value, weight)
            # The share of stale tokens whose version's snapshot was kept (the others use the fallback).
            n_stale = float(stale.sum())
            m.mean("offpolicy/exact_frac", float(known.sum()) / max(n_stale, 1.0), n_stale)
        applied = torch.where(iw.keep, iw.weight, 0.0)
        w.is_sums = (float(applied.sum()), float(applied.square().sum()), float((mb.loss_mask != 0).sum()))


def value_step_loss(values: Tensor, w: Scored, algo: AlgorithmConfig, m: StepMetrics) -> Tensor:
    """The critic's clipped value loss of one micro-batch from its values [B, T] (token mean within
    the micro-batch; weight it with `Normalisers.value_weight`). Records the metrics in `m`."""
    from trainer.losses import value_loss

    n_tok = float(w.mb.num_loss_tokens)
    vl = value_loss(values, w.old_values, w.returns, w.mb.loss_mask, algo.value_clip)
    m.mean("loss/value", float(vl.detach()), n_tok)
    m.mean("value/mean", masked_mean(values, w.mb.loss_mask), n_tok)
    return vl


def masked_mean(x: Tensor, mask: Tensor) -> float:
    """Mean of x over mask != 0 (0.0 when empty), detached, as a Python float."""
    m = mask != 0
    return float(torch.where(m, x.detach().float(), 0.0).sum() / m.sum().clamp(min=1))


def masked_abs_mean(a: Tensor, b: Tensor, mask: Tensor) -> float:
    """Mean |a - b| over mask != 0 (0.0 when empty)."""
    m = mask != 0
    return float(torch.where(m, (a.float() - b.float()).abs(), 0.0).sum() / m.sum().clamp(min=1))
