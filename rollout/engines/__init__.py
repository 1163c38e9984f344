"""Inference engines behind one contract (rollout/engines/base.py): vLLM (rollout/engines/vllm.py),
the default on every machine, and transformers generate (rollout/engines/hf.py), a fallback for
architectures vLLM lacks. `make_engine` builds the configured one.

Importing this package imports neither vLLM nor torch: `start()` does.
"""

from __future__ import annotations

from typing import Any

from rollout.engines.base import Engine
from slime.core.config import ModelConfig, RolloutConfig


def make_engine(
    model_dir: str,
    model_cfg: ModelConfig,
    cfg: RolloutConfig,
    seed: int,
    work_dir: str,
    capture_routes: bool = False,
    capture_indexer: bool = False,
) -> Engine:
    """The configured engine: vLLM by default, transformers generate only as a fallback. Both get the
    same settings (rollout/engines/base.py `EngineSettings`); each uses the ones that apply to it."""
    options: dict[str, Any] = {
        "dtype": model_cfg.dtype,
        "max_model_len": cfg.max_model_len,
        "kv_cache_gib": cfg.kv_cache_gib,
        "enforce_eager": cfg.enforce_eager,
        "seed": seed,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "work_dir": work_dir,
        "num_threads": cfg.threads_per_worker,
        "capture_routes": capture_routes,
        "capture_indexer": capture_indexer,
        "weight_alias": cfg.weight_alias,
        "gpu_memory_utilization": cfg.gpu_memory_utilization,
        "trust_remote_code": model_cfg.trust_remote_code,
    }
    if cfg.engine == "vllm":
        from rollout.engines.vllm import VLLMEngine

        return VLLMEngine(model_dir, **options)
    from rollout.engines.hf import TransformersEngine

    return TransformersEngine(model_dir, **options)
