"""LoRA on the policy: peft adapters, the adapters-off reference, and the merged export.

Contracts:

- `wrap(model, cfg)` runs before `deepspeed.initialize` (trainer/rank.py). It returns peft's
  `PeftModelForCausalLM` around the transformers model with every base parameter frozen, so
  `trainer.build._adamw` puts only the adapters in the optimizer and DeepSpeed keeps gradients and
  optimizer state for them only. Every adapted layer must be an `nn.Linear` inside a decoder layer
  (`model.layers.N.`): the export gathers and merges one decoder layer at a time, and a tied LM head
  would lose its update (the checkpoint format leaves tied weights out).
- Names: the wrapped model's parameters are `base_model.model.<transformers name>`; an adapted linear
  layer `L` keeps its frozen weight at `L.base_layer.weight` (and bias) and its adapter at
  `L.lora_A.default.weight` [r, in] and `L.lora_B.default.weight` [out, r].
- `merge(full, scales, dtype)` turns gathered tensors under those names into transformers names with
  `L.weight = W + scale * B @ A` (scale = alpha / r), computed in float32 into new tensors: the live
  parameters are never touched, so training continues on the unmerged adapter. Weight pushes and the
  checkpoint's `hf/` export carry only merged weights (trainer/export.py).
- `AdaptersOff(policy)` is the KL reference: the policy's forward with its adapters disabled, i.e. the
  frozen base model, without a second copy of it.
- `adapter_tensors` + `save_adapter` write the adapter in peft's own format (`adapter_config.json`,
  `adapter_model.safetensors`), loadable with `peft.PeftModel.from_pretrained(base, path)`.
"""

from __future__ import annotations

import re
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from slime.core.config import LORA_ALL_LINEAR, LoraConfig

ADAPTER = "default"  # peft's name for the one adapter
_PREFIX = "base_model.model."  # what PeftModelForCausalLM puts before the transformers names
_ADAPTER_WEIGHT = re.compile(rf"^(.*)\.lora_([AB])\.{ADAPTER}\.weight$")
_BASE_WEIGHT = re.compile(r"^(.*)\.base_layer\.(weight|bias)$")
_IN_DECODER_LAYER = re.compile(r"\.layers\.\d+\.")


def wrap(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """`model` (a transformers causal LM) with LoRA adapters of rank `cfg.r` on `cfg.target_modules`,
    base parameters frozen; raises ValueError naming `model.lora.target_modules` when the targets
    match nothing or a layer the merged export cannot fold back."""
    import peft

    targets = list(cfg.target_modules)
    peft_cfg = peft.LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=LORA_ALL_LINEAR if targets == [LORA_ALL_LINEAR] else targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        wrapped = peft.get_peft_model(model, peft_cfg)
    except ValueError as e:
        raise ValueError(f"model.lora.target_modules={targets}: {e}") from e
    adapted_scales(wrapped)  # checks every adapted layer
    return wrapped


def is_lora(module: nn.Module) -> bool:
    """Whether `module` (a DeepSpeed model's `.module`) is a policy wrapped by `wrap`."""
    return hasattr(module, "peft_config") and hasattr(module, "get_base_model")


def unwrap(module: nn.Module) -> nn.Module:
    """The transformers model of a wrapped policy (its class and config); `module` itself otherwise."""
    return module.get_base_model() if is_lora(module) else module


def adapted_scales(module: nn.Module) -> dict[str, float]:
    """{transformers name of an adapted linear layer: alpha / r} of a wrapped policy ({} when not
    wrapped). Raises ValueError for an adapted layer that `merge` cannot fold back."""
    if not is_lora(module):
        return {}
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    scales: dict[str, float] = {}
    for name, layer in module.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        name = name.removeprefix(_PREFIX)
        ok = (
            isinstance(layer, LoraLinear)
            and type(layer.get_base_layer()) is nn.Linear
            and not layer.fan_in_fan_out
            and not layer.use_dora.get(ADAPTER, False)
        )
        if not ok:
            raise ValueError(
                f"model.lora.target_modules: {name} is adapted as a {type(layer).__name__} over a "
                f"{type(layer.get_base_layer()).__name__}; the merged export handles plain nn.Linear layers "
                "of dense models only: name other modules"
            )
        if not _IN_DECODER_LAYER.search(f".{name}"):
            raise ValueError(
                f"model.lora.target_modules adapts {name}, which is outside the decoder layers "
                "(`...layers.N.`, which the export merges one at a time): name modules inside them"
            )
        scales[name] = float(layer.scaling[ADAPTER])
    return scales


def merge(full: dict[str, Tensor], scales: dict[str, float], dtype: torch.dtype) -> dict[str, Tensor]:
    """Full tensors of one decoder layer (or any group holding each adapter with its base weight)
    under the wrapped policy's names -> the same weights under transformers names in `dtype`, every
    adapted layer merged: L.weight = W [out, in] + scale * B [out, r] @ A [r, in], in float32, into
    a new tensor (the inputs are not modified)."""
    out: dict[str, Tensor] = {}
    pairs: dict[str, dict[str, Tensor]] = {}
    for name, t in full.items():
        name = name.removeprefix(_PREFIX)
        if m := _ADAPTER_WEIGHT.match(name):
            pairs.setdefault(m.group(1), {})[m.group(2)] = t
            continue
        m = _BASE_WEIGHT.match(name)
        out[f"{m.group(1)}.{m.group(2)}" if m and m.group(1) in scales else name] = t
    for layer, ab in pairs.items():
        w = out[f"{layer}.weight"]
        out[f"{layer}.weight"] = torch.addmm(w.float(), ab["B"].float(), ab["A"].float(), alpha=scales[layer])
    return {k: v.to(dtype) for k, v in out.items()}


class AdaptersOff:
    """The KL reference of a LoRA policy: the frozen base model, run as the policy's own forward with
    its adapters disabled (peft's `disable_adapter`). Called like a model by `trainer.forward.Forward`;
    only under `torch.no_grad` (it toggles the adapters' requires_grad off and back on)."""

    def __init__(self, policy: Any) -> None:
        self.policy = policy  # the DeepSpeed model whose `.module` is the wrapped policy

    def __call__(self, **kwargs: Any) -> Any:
        with self.policy.module.disable_adapter():
            return self.policy(**kwargs)


def adapter_tensors(module: nn.Module) -> dict[str, Tensor]:
    """Every adapter weight of a wrapped policy, full, float32, on CPU, under the wrapped names.
    Under ZeRO-3 this gathers: all ranks call it together."""
    import deepspeed

    params = [(n, p) for n, p in module.named_parameters() if _ADAPTER_WEIGHT.match(n)]
    partitioned = [p for _, p in params if hasattr(p, "ds_id")]
    ctx = deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None) if partitioned else nullcontext()
    with ctx:
        return {n: p.detach().to(device="cpu", dtype=torch.float32).clone() for n, p in params}


def save_adapter(module: nn.Module, tensors: dict[str, Tensor], out_dir: str) -> str:
    """Write the adapter (`adapter_tensors`) in peft's format into `out_dir`; its
    `base_model_name_or_path` is the model directory the run started from. Returns out_dir."""
    module.save_pretrained(out_dir, state_dict=tensors, save_embedding_layers=False)
    return out_dir
