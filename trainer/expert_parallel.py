"""Expert parallelism through DeepSpeed AutoEP: configuration, optimizer groups, and full weights out.

With `trainer.expert_parallel_size=k > 1`, `deepspeed.initialize` gets an `expert_parallel` section:
DeepSpeed (AutoEP, deepspeed/module_inject/auto_ep*.py) replaces every transformers MoE block by an
`AutoEPMoELayer` whose experts are split into k shards, one per rank of an expert-parallel group of k
ranks, tokens travelling to their experts' rank and back by all-to-all; the router (`router.gate`), the
shared experts and everything else stay replicated and data-parallel. Experts are data-parallel over
num_ranks / k ranks (DeepSpeed's expert-data-parallel groups). Nothing here moves tokens: DeepSpeed
does.

Decisions:

- The grouped-expert matmul runs as a loop over local experts (`use_grouped_mm: false`): Triton has no
  CPU backend, and torch's `_grouped_mm` is a CUDA op (on GPUs set both back for speed; not run here).
- Presets: the model's `model_type` picks AutoEP's preset (`slime.core.model.AUTOEP_PRESETS`); GLM-4.5/GLM-5
  MoE blocks (`glm4_moe`) use the DeepSeek-V3 preset, the same block (sigmoid scores, correction bias,
  grouped top-k, shared expert, `routed_scaling_factor`).
- The optimizer is handed over as a factory: AutoEP replaces the expert parameters inside
  `deepspeed.initialize`, and DeepSpeed's ZeRO wants the expert parameters in their own param groups
  (`'moe': True`), which only exist after the replacement.
- Weights out: each AutoEP layer's local experts are all-gathered over its expert-parallel group and put
  back into transformers' in-memory layout (`experts.gate_up_proj` [E, 2F, H] = gate (w1) then up (w3),
  `experts.down_proj` [E, H, F] = w2, `gate.weight`, `gate.e_score_correction_bias`), so that the usual
  conversion (`slime.core.checkpoint.to_checkpoint_format`) writes ordinary per-expert checkpoint names.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from slime.core.config import TrainerConfig
from slime.core.model import AUTOEP_PRESETS


def autoep_section(cfg: TrainerConfig, model_type: str) -> dict[str, Any]:
    """The DeepSpeed config's `expert_parallel` section for `cfg.expert_parallel_size` > 1."""
    preset = AUTOEP_PRESETS.get(model_type)
    if preset is None:
        raise ValueError(
            f"trainer.expert_parallel_size={cfg.expert_parallel_size}: model_type {model_type!r} has no "
            f"DeepSpeed AutoEP preset here (supported: {', '.join(sorted(AUTOEP_PRESETS))})"
        )
    return {
        "enabled": True,
        "autoep_size": int(cfg.expert_parallel_size),
        "preset_model": preset,
        "use_grouped_mm": False,
        "disable_triton_grouped_mm": True,
    }


def moe_param_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`groups` (each with params and hyper-parameters) split so that expert-parallel parameters sit in
    their own groups marked `'moe': True`, as DeepSpeed's ZeRO optimizers require."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    named = [{**g, "name": g.get("name", f"group{i}")} for i, g in enumerate(groups)]
    return [g for g in split_params_into_different_moe_groups_for_optimizer(named) if g["params"]]


def is_autoep_layer(module: nn.Module) -> bool:
    return type(module).__name__ == "AutoEPMoELayer"


def autoep_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> AutoEP layer, for every replaced MoE block of `model`."""
    return {name: m for name, m in model.named_modules() if is_autoep_layer(m)}


def expert_shards(model: nn.Module) -> tuple[int, int]:
    """(expert parameters this rank holds, expert parameters of the whole model) over the AutoEP
    layers (0, 0 without any)."""
    local = total = 0
    for layer in autoep_layers(model).values():
        for p in layer.experts.parameters():
            local += p.numel()
            total += p.numel() * layer.ep_size
    return local, total


def _gather_experts(layer: nn.Module, local: Tensor) -> Tensor:
    """[E_local, ...] on this rank -> [E, ...] in global expert order (a collective over the layer's
    expert-parallel group)."""
    import torch.distributed as dist
    from deepspeed.checkpoint.autoep_affine import autoep_experts_for_rank

    if layer.ep_size == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(layer.ep_size)]
    dist.all_gather(parts, local.contiguous(), group=layer.ep_group)
    full = torch.empty((layer.num_experts, *local.shape[1:]), dtype=local.dtype, device=local.device)
    for r, part in enumerate(parts):
        ids = autoep_experts_for_rank(layer.expert_placement_descriptor, r)
        full[torch.tensor(ids, device=local.device)] = part
    return full


def to_transformers_layout(
    layers: dict[str, nn.Module], group: list[tuple[str, Tensor]]
) -> list[tuple[str, Tensor]]:
    """One decoder layer's (name, tensor) entries with every AutoEP layer in it (`layers`, from
    `autoep_layers`) put back into transformers' in-memory names and layout, experts gathered from all
    ranks of its expert-parallel group (a collective: every rank calls it for the same layers). Other
    entries pass unchanged."""
    if not layers:
        return group
    out: list[tuple[str, Tensor]] = []
    experts: dict[str, dict[str, Tensor]] = {}
    for name, t in group:
        owner = next((p for p in layers if name.startswith(p + ".")), None)
        if owner is None:
            out.append((name, t))
            continue
        rest = name[len(owner) + 1 :]
        if rest.startswith("experts."):
            experts.setdefault(owner, {})[rest.split(".", 1)[1]] = t
        elif rest.startswith("router."):
            # router.gate.weight -> gate.weight; router.e_score_correction_bias -> gate.e_score_...
            leaf = rest.removeprefix("router.").removeprefix("gate.")
            out.append((f"{owner}.gate.{leaf}", t))
        else:
            out.append((name, t))  # shared experts keep their names
    for owner, ws in experts.items():
        layer = layers[owner]
        w1, w2, w3 = (_gather_experts(layer, ws[k].detach()) for k in ("w1", "w2", "w3"))
        out.append((f"{owner}.experts.gate_up_proj", torch.cat([w1, w3], dim=1)))  # [E, 2F, H]
        out.append((f"{owner}.experts.down_proj", w2))  # [E, H, F]
    return out
