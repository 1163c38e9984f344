"""The `rollout` group (configs/rollout/): the rollout workers and their inference engines."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from slime.core.config.fields import _require, _require_non_negative, _require_positive, opt


class Engine(enum.StrEnum):
    vllm = "vllm"
    transformers = "transformers"


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
