"""The `trainer` group (configs/trainer/): the DeepSpeed trainer ranks and their optimizer."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from omegaconf import MISSING

from slime.core.config.fields import Dtype, _require, _require_non_negative, _require_positive, opt


class OnStop(enum.StrEnum):
    finish = "finish"
    abandon = "abandon"


@dataclass
class MoeConfig:
    """Router losses of mixture-of-experts models (ignored for dense models). Each is added to the
    policy loss when its coefficient is > 0; both are logged for every MoE run (`moe/` metrics)."""

    aux_loss_coef: float = opt(
        -1.0, "load-balancing loss coefficient (< 0: the model config's router_aux_loss_coef, else 0)"
    )
    z_loss_coef: float = opt(
        -1.0, "router z-loss coefficient (< 0: the model config's router_z_loss_coef, else 0)"
    )


@dataclass
class TrainerConfig:
    """DeepSpeed trainer ranks (Ray actors in one process group)."""

    steps: int = opt(MISSING, "optimizer steps to run (each experiment sets it)")
    num_ranks: int = opt(1, "trainer processes (data parallel); batch_groups must be divisible by it")
    batch_groups: int = opt(8, "groups consumed per optimizer step (one policy version)")
    micro_batch_size: int = opt(8, "sequences per forward/backward on one rank")
    lr: float = opt(1e-6, "AdamW learning rate")
    weight_decay: float = opt(0.0, "AdamW weight decay (matrices only; norms and biases are never decayed)")
    betas: list[float] = opt([0.9, 0.999], "AdamW betas")
    warmup_steps: int = opt(0, "linear LR warm-up over this many optimizer steps")
    grad_clip: float = opt(1.0, "global gradient-norm clip (0 = off)")
    zero_stage: int = opt(
        1, "DeepSpeed ZeRO stage (3 partitions the weights; 2 or 3 shard MoE experts)", choices=(0, 1, 2, 3)
    )
    dtype: Dtype = opt(Dtype.auto, "training precision (auto: bfloat16 where native, else float32)")
    gradient_checkpointing: bool = opt(
        False, "trade compute for activation memory (needs share_prefix=false)"
    )
    share_prefix: bool = opt(
        True,
        "run tokens that a micro-batch's rows share once (packed: every group's prompt; padded: the "
        "rows' common prefix); ZeRO 0-2, skipped under ZeRO-3",
    )
    pack: bool = opt(
        True,
        "run a micro-batch's sequences packed into one row, no padding (sdpa models; others, and sparse-attention "
        "(DSA) models, train padded)",
    )
    skip_zero_advantage: bool = opt(
        True,
        "leave sequences whose advantage is exactly 0 out of the forward and backward where that cannot "
        "change the update (sequence-level advantages, no KL, no entropy bonus, no router losses)",
    )
    save_every: int = opt(0, "checkpoint every N steps (0 = only at the end)")
    save_final: bool = opt(
        True, "checkpoint when the last step is done (false: a smoke test or benchmark that needs none)"
    )
    keep_checkpoints: int = opt(0, "keep only the newest K complete checkpoints (0 = keep all)")
    on_stop: OnStop = opt(
        OnStop.finish, "on SIGINT/SIGTERM: finish the current step and checkpoint, or abandon it"
    )
    stop_timeout_s: float = opt(60.0, "a stop on a signal exits within this many seconds, done or not")
    weight_bucket_mb: int = opt(256, "size of one weight-push bucket in MB")
    num_cpus_per_rank: float = opt(1.0, "Ray CPU resources per rank")
    threads_per_rank: int = opt(
        0,
        "torch/OMP threads of a rank (0 = auto: the cores that busy rollout engines do not claim, / num_ranks, "
        "rechecked every forward)",
    )
    gpus_per_rank: float = opt(0.0, "Ray GPU resources per rank (0 = CPU training with gloo)")
    expert_parallel_size: int = opt(
        1,
        "ranks that share one copy of each MoE layer's experts (DeepSpeed AutoEP, all-to-all token dispatch); "
        "divides num_ranks and the expert count; ZeRO 1-2",
    )
    moe: MoeConfig = opt(MoeConfig, "mixture-of-experts router losses")

    def validate(self) -> None:
        _require_positive(
            self,
            "trainer",
            "steps",
            "num_ranks",
            "batch_groups",
            "micro_batch_size",
            "lr",
            "weight_bucket_mb",
            "stop_timeout_s",
            "expert_parallel_size",
        )
        _require_non_negative(
            self,
            "trainer",
            "weight_decay",
            "warmup_steps",
            "grad_clip",
            "save_every",
            "keep_checkpoints",
            "threads_per_rank",
            "num_cpus_per_rank",
            "gpus_per_rank",
        )
        _require(
            len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
            f"trainer.betas must be two numbers in [0, 1), got {list(self.betas)}",
        )
        # Recomputing a layer in the backward would append its prefix keys to the cache a second time.
        _require(
            not (self.share_prefix and self.gradient_checkpointing),
            "trainer.share_prefix=true cannot be combined with trainer.gradient_checkpointing=true; "
            "set trainer.share_prefix=false to checkpoint activations",
        )
        _require(
            self.batch_groups % self.num_ranks == 0,
            f"trainer.batch_groups ({self.batch_groups}) must be divisible by trainer.num_ranks "
            f"({self.num_ranks})",
        )
