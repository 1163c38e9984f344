"""What slime knows about the configured model before it is loaded: its number of experts, its
transformers `model_type`, and the DeepSpeed AutoEP preset for that type. The checks in
`slime.validation`, the rollout fleet and the expert-parallel trainer read them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from slime.config import ModelConfig, ModelSource

_EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def count_experts(hf_config: Mapping[str, Any]) -> int:
    """Routed experts per MoE layer in a transformers config dict; 0 for a dense model."""
    for cfg in (hf_config, hf_config.get("text_config") or {}):
        for key in _EXPERT_COUNT_KEYS:
            n = cfg.get(key)
            if isinstance(n, int) and not isinstance(n, bool) and n > 0:
                return n
    return 0


def model_num_experts(model: ModelConfig) -> int | None:
    """Experts per MoE layer of the configured model, 0 when dense, None when it cannot be known
    before the model is resolved (a hub id, or source=random without an expert count in hf_config)."""
    if model.source == ModelSource.smollm2_gguf:
        return 0  # SmolLM2 is a dense Llama
    if model.source == ModelSource.random:
        # The architecture's config class fills in what hf_config leaves out (e.g. Qwen3-MoE's
        # default expert count); importing transformers costs seconds, so only callers that need it ask.
        try:
            import transformers

            config = getattr(transformers, model.architecture).config_class(**model.hf_config)
        except Exception:
            return count_experts(model.hf_config) or None
        return count_experts(config.to_dict())
    config_json = Path(model.path).expanduser() / "config.json"
    if config_json.is_file():
        return count_experts(json.loads(config_json.read_text(encoding="utf-8")))
    return None


# transformers model_type -> DeepSpeed AutoEP preset (trainer.expert_parallel_size > 1). GLM-4.5/GLM-5's
# MoE block is DeepSeek-V3's (sigmoid scores, correction bias, grouped top-k, one shared expert).
AUTOEP_PRESETS: dict[str, str] = {
    "qwen3_moe": "qwen3_moe",
    "qwen2_moe": "qwen3_moe",
    "mixtral": "mixtral",
    "deepseek_v3": "deepseek_v3",
    "glm4_moe": "deepseek_v3",
}


def model_type_of(model: ModelConfig) -> str | None:
    """The transformers `model_type` of the configured model; None when it cannot be known before the
    model is resolved (a hub id)."""
    if model.source == ModelSource.smollm2_gguf:
        return "llama"
    if model.source == ModelSource.random:
        try:
            import transformers

            return str(getattr(transformers, model.architecture).config_class.model_type)
        except Exception:
            return None
    config_json = Path(model.path).expanduser() / "config.json"
    if config_json.is_file():
        return json.loads(config_json.read_text(encoding="utf-8")).get("model_type")
    return None
