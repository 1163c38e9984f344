"""The `algorithm` group (configs/algorithm/): the RL objective: advantages, loss, off-policy correction."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from omegaconf import MISSING

from slime.core.config.fields import _require, _require_non_negative, _require_positive, opt


class AlgorithmName(enum.StrEnum):
    grpo = "grpo"
    dr_grpo = "dr_grpo"
    dapo = "dapo"
    gspo = "gspo"
    rloo = "rloo"
    reinforce_pp = "reinforce_pp"
    ppo = "ppo"


class Advantage(enum.StrEnum):
    grpo = "grpo"
    dr_grpo = "dr_grpo"
    rloo = "rloo"
    reinforce_pp = "reinforce_pp"
    gae = "gae"


class Level(enum.StrEnum):
    token = "token"
    sequence = "sequence"


class LossAgg(enum.StrEnum):
    token_mean = "token_mean"
    seq_mean = "seq_mean"
    seq_sum_norm = "seq_sum_norm"


class OffPolicy(enum.StrEnum):
    none = "none"
    tis = "tis"
    mask = "mask"
    decoupled = "decoupled"
    factored = "factored"  # the discrepancy and staleness factors handled separately (trainer/importance.py)


class IsLevel(enum.StrEnum):
    token = "token"
    sequence = "sequence"  # the product of the sequence's token ratios
    geomean = "geomean"  # their geometric mean


class IsMode(enum.StrEnum):
    none = "none"
    weight = "weight"
    truncate = "truncate"
    clip = "clip"
    mask = "mask"
    reject = "reject"
    m2 = "m2"


class KlEstimator(enum.StrEnum):
    k1 = "k1"
    k2 = "k2"
    k3 = "k3"


class KlMode(enum.StrEnum):
    loss = "loss"
    reward = "reward"


class RoutingReplay(enum.StrEnum):
    none = "none"  # the trainer's routers choose experts themselves
    rollout = "rollout"  # the trainer's forward uses the experts the rollout engine chose (R3)
    old = "old"  # the trainer's forward uses the experts of its own first (old-policy) forward


class IndexerReplay(enum.StrEnum):
    none = "none"  # the trainer's sparse-attention indexers choose their keys themselves
    rollout = "rollout"  # the trainer's attention uses the keys the rollout engine's indexers chose


@dataclass
class IsFactorConfig:
    """One importance-sampling factor (trainer/importance.py): at what level its ratio is taken and how
    it is handled. Modes: none (ignored), weight (w), truncate (min(w, high)), clip (clamp(w, low,
    high)), mask (w, units outside [low, high] dropped), reject (1, units outside dropped), m2 (w,
    units with the largest log(w)^2 dropped until their mean is <= algorithm.m2_tau)."""

    level: IsLevel = opt(
        IsLevel.token, "per token, per sequence (product) or geometric mean over the sequence"
    )
    mode: IsMode = opt(IsMode.truncate, "none, weight, truncate, clip, mask, reject or m2")
    low: float = opt(0.0, "clip / mask / reject: lower bound of the weight")
    high: float = opt(2.0, "truncate / clip / mask / reject: upper bound of the weight")

    def check(self, key: str) -> None:
        _require(
            0.0 <= self.low <= 1.0 <= self.high,
            f"{key}.low ({self.low}) and {key}.high ({self.high}) must satisfy 0 <= low <= 1 <= high "
            "(an on-policy token keeps weight 1)",
        )


@dataclass
class DistillConfig:
    """On-policy distillation (docs/algorithms.md): a teacher scores the student's own tokens on its own
    engine beside each rollout worker's, and the per-token reverse KL, log p_teacher - log p_student, is
    the advantage (alone, or added to the environment's)."""

    teacher: str = opt(
        "",
        "teacher model: a transformers checkpoint dir, a configs/model name (e.g. smollm2_135m) or a hub "
        "id; it must share the student's tokenizer (empty: no distillation)",
    )
    coef: float = opt(1.0, "weight of the reverse-KL advantage (teacher logprob - student logprob) per token")
    env_coef: float = opt(1.0, "weight of the environment's advantage beside it (0: distillation alone)")

    def validate(self) -> None:
        if self.teacher:
            _require_non_negative(self, "algorithm.distill", "coef", "env_coef")
            _require(
                self.coef > 0 or self.env_coef > 0,
                "algorithm.distill.coef and algorithm.distill.env_coef cannot both be 0",
            )


@dataclass
class AlgorithmConfig:
    """The RL objective: advantages, policy loss, off-policy correction, regularisers."""

    name: AlgorithmName = opt(MISSING, "label of the preset (configs/algorithm/NAME.yaml)")
    advantage: Advantage = opt(Advantage.grpo, "advantage estimator (gae trains a critic)")
    normalize_adv_std: bool = opt(True, "divide group-centred rewards by the group std (GRPO)")
    clip_low: float = opt(0.2, "PPO ratio clip below 1 - clip_low")
    clip_high: float = opt(0.2, "PPO ratio clip above 1 + clip_high (DAPO clip-higher raises it)")
    ratio_level: Level = opt(Level.token, "importance ratio per token, or per sequence (GSPO)")
    loss_agg: LossAgg = opt(
        LossAgg.token_mean, "loss aggregation (seq_sum_norm: Dr. GRPO constant normaliser)"
    )
    off_policy: OffPolicy = opt(
        OffPolicy.tis,
        "off-policy correction: none, truncated IS, mask out-of-band tokens, decoupled (one factor on "
        "pi_prox / mu), or factored (algorithm.discrepancy and algorithm.staleness each their own way)",
    )
    off_policy_level: IsLevel = opt(
        IsLevel.token, "none/tis/mask/decoupled: per token, per sequence (product) or geometric mean"
    )
    tis_cap: float = opt(2.0, "truncation of the behaviour importance weight (>= 1)")
    mask_low: float = opt(0.5, "mask: drop tokens whose behaviour ratio is below this")
    mask_high: float = opt(2.0, "mask: ... or above this")
    decoupled_cap: float = opt(0.0, "decoupled: drop tokens whose behaviour weight exceeds this (0 = off)")
    discrepancy: IsFactorConfig = opt(
        IsFactorConfig(mode=IsMode.truncate, high=2.0),
        "factored: the train-inference factor pi_v / mu (engine vs trainer at the token's own version)",
    )
    staleness: IsFactorConfig = opt(
        IsFactorConfig(mode=IsMode.truncate, high=2.0),
        "factored: the staleness factor pi_prox / pi_v (the token's version vs the current one)",
    )
    m2_tau: float = opt(0.04, "mode m2: bound on the mean squared log-ratio of the kept units (M2PO)")
    behavior_snapshots: int = opt(
        0,
        "past versions whose weights the trainer keeps to score stale tokens at their own version "
        "(pi_v, the factored split made exact); 0: pi_v is taken as mu for stale tokens",
    )
    ess_lr_power: float = opt(
        0.0, "VCPO-style step control: each optimizer step's learning rate times ESS^power (0 = off)"
    )
    ess_lr_floor: float = opt(0.0, "the smallest learning-rate multiplier the ESS control may give")
    distill: DistillConfig = opt(DistillConfig, "on-policy distillation from a teacher")
    kl_coef: float = opt(0.0, "KL to a frozen reference model (0 = no reference model)")
    kl_estimator: KlEstimator = opt(KlEstimator.k3, "KL estimator")
    kl_mode: KlMode = opt(KlMode.loss, "KL as a loss term, or as a per-token reward penalty")
    entropy_coef: float = opt(0.0, "entropy bonus")
    dynamic_sampling: bool = opt(False, "DAPO: drop groups whose rewards do not vary, refill the batch")
    overlong_buffer: int = opt(0, "DAPO overlong shaping: tokens before the limit where the penalty starts")
    overlong_penalty: float = opt(1.0, "DAPO overlong shaping: penalty at the limit")
    gamma: float = opt(1.0, "PPO/GAE discount")
    lam: float = opt(1.0, "PPO/GAE lambda")
    critic_lr: float = opt(1e-5, "PPO critic learning rate")
    value_clip: float = opt(0.2, "PPO value clip")
    ppo_epochs: int = opt(1, "passes over each batch")
    num_minibatches: int = opt(1, "optimizer steps per pass (the policy version still moves by 1 per batch)")
    routing_replay: RoutingReplay = opt(
        RoutingReplay.none,
        "MoE routing replay: rollout = the trainer's forward uses the experts the engine chose; old = those "
        "of its own old-policy pass; none = its routers choose (moe/routing_mismatch is logged either way)",
    )
    indexer_replay: IndexerReplay = opt(
        IndexerReplay.none,
        "sparse-attention (DSA) indexer replay: rollout = the trainer's attention uses the keys the engine's "
        "indexers kept; none = its indexers choose (dsa/index_mismatch is logged either way)",
    )

    def validate(self) -> None:
        _require_positive(self, "algorithm", "ppo_epochs", "num_minibatches", "critic_lr")
        _require_non_negative(
            self,
            "algorithm",
            "clip_low",
            "clip_high",
            "kl_coef",
            "overlong_buffer",
            "overlong_penalty",
            "value_clip",
        )
        _require(
            self.tis_cap >= 1.0, f"algorithm.tis_cap must be >= 1 (on-policy weight 1), got {self.tis_cap}"
        )
        _require(
            0.0 <= self.mask_low <= 1.0 <= self.mask_high,
            f"algorithm.mask_low ({self.mask_low}) and algorithm.mask_high ({self.mask_high}) must satisfy "
            "0 <= mask_low <= 1 <= mask_high",
        )
        _require(
            self.decoupled_cap == 0.0 or self.decoupled_cap >= 1.0,
            f"algorithm.decoupled_cap must be 0 or >= 1, got {self.decoupled_cap}",
        )
        self.discrepancy.check("algorithm.discrepancy")
        self.staleness.check("algorithm.staleness")
        _require_non_negative(self, "algorithm", "behavior_snapshots", "ess_lr_power")
        _require(self.m2_tau > 0, f"algorithm.m2_tau must be > 0, got {self.m2_tau}")
        _require(
            0.0 <= self.ess_lr_floor <= 1.0,
            f"algorithm.ess_lr_floor must be in [0, 1], got {self.ess_lr_floor}",
        )
        self.distill.validate()
        for name in ("gamma", "lam"):
            value = getattr(self, name)
            _require(0.0 <= value <= 1.0, f"algorithm.{name} must be in [0, 1], got {value}")
