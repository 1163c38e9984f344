"""Building what a rank trains: precision, the DeepSpeed config, and the DeepSpeed models.

Decisions:

- Optimizer: a fused `torch.optim.AdamW` instance handed to `deepspeed.initialize`
  (`zero_allow_untested_optimizer`), never an "optimizer" block in the DeepSpeed config, which would
  JIT-compile DeepSpeed's CPU Adam on first use (docs/benchmarks.md has the cost).
- Precision: `trainer.dtype=bfloat16` uses DeepSpeed's bf16 mode (bf16 weights and compute, fp32
  master weights and optimizer state) where the hardware computes bf16 natively
  (`slime.core.model.has_native_bf16`); elsewhere it falls back to fp32 with a logged warning, because
  emulated bf16 matmuls are several times slower than fp32.
- Gradient accumulation is owned by the trainer (`managed_gradient_accumulation: false`): each
  optimizer step runs a variable number of micro-batches and ends with one `step()`.
- Models are built normally (not under `deepspeed.zero.Init`, which skips transformers' weight init)
  in fp32, so the fp32 master weights start exactly from the checkpoint; DeepSpeed casts the module
  to bf16 when bf16 is on. Dropout is set to p=0: recomputed logprobs must be deterministic for
  importance ratios.
- grad_norm is the pre-clip global norm; DeepSpeed reports it for ZeRO 1-3 and bf16, and for ZeRO-0
  in fp32 `build_trainable` clips and measures it itself (`_record_grad_norm`).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from slime.core.config import ModelConfig, TrainerConfig

log = logging.getLogger(__name__)


def resolve_precision(requested: str, use_cuda: bool) -> bool:
    """Whether to train in bf16 for `trainer.dtype=requested` (already resolved from `auto`);
    warns when bf16 falls back to fp32."""
    from slime.core.model import has_native_bf16

    if requested != "bfloat16":
        return False
    ok = has_native_bf16(cuda=use_cuda)
    if not ok:
        where = "this GPU" if use_cuda else f"this CPU ({torch.backends.cpu.get_cpu_capability()})"
        log.warning("trainer.dtype=bfloat16 but %s has no native bf16: training in float32", where)
    return ok


def deepspeed_config(
    cfg: TrainerConfig,
    bf16: bool,
    stage: int | None = None,
    train: bool = True,
    expert_parallel: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The DeepSpeed config for one model (no "optimizer"/"scheduler" blocks: see the module docstring);
    `expert_parallel` is AutoEP's section (trainer/expert_parallel.py), for the policy only."""
    stage = cfg.zero_stage if stage is None else stage
    zero: dict[str, Any] = {"stage": stage}
    if stage == 1:
        # managed_gradient_accumulation=false supports overlap_comm only with stages 2/3.
        zero["overlap_comm"] = False
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if expert_parallel is not None:
        ds["expert_parallel"] = expert_parallel
    if train:
        ds.update(
            {
                "managed_gradient_accumulation": False,
                # ZeRO-0 in fp32 hands the step to the torch optimizer, and DeepSpeed then neither
                # reports the gradient norm nor returns it from its clip: `_record_grad_norm` clips
                # and records instead.
                "gradient_clipping": 0.0 if _plain_torch_step(stage, bf16) else float(cfg.grad_clip),
                "zero_allow_untested_optimizer": True,
            }
        )
    return ds


def load_causal_lm(model_dir: str, model_cfg: ModelConfig) -> nn.Module:
    """The transformers causal LM of `model_dir` in fp32, without KV cache by default or dropout."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, trust_remote_code=model_cfg.trust_remote_code
    )
    model.config.use_cache = False
    no_dropout(model)
    return model


def no_dropout(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


def build_trainable(
    module: nn.Module,
    lr: float,
    cfg: TrainerConfig,
    bf16: bool,
    expert_parallel: dict[str, Any] | None = None,
) -> Any:
    """`module` as a DeepSpeed model with its own AdamW at `lr`, in train mode (the policy and the
    critic are both built here). With `expert_parallel` (AutoEP's config section) DeepSpeed shards the
    MoE experts while it builds the model; the optimizer is then created after that replacement, with
    the expert parameters in their own groups (trainer/expert_parallel.py)."""
    import deepspeed

    if cfg.gradient_checkpointing:
        # The critic keeps its transformer as `.body`; the policy is the transformer itself.
        target = getattr(module, "body", module)
        target.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if expert_parallel is None:
        optimizer: Any = _adamw(module, lr, cfg)
    else:
        from trainer.expert_parallel import moe_param_groups

        def optimizer(_params: Any) -> torch.optim.AdamW:
            return _adamw(module, lr, cfg, split=moe_param_groups)

    model, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, config=deepspeed_config(cfg, bf16, expert_parallel=expert_parallel)
    )
    if _plain_torch_step(cfg.zero_stage, bf16):
        _record_grad_norm(model, cfg.grad_clip)
    model.train()
    return model


def build_frozen(module: nn.Module, cfg: TrainerConfig, bf16: bool, device: torch.device) -> Any:
    """A frozen copy for scoring only (the KL reference), in eval mode: partitioned by an
    optimizer-less ZeRO-3 DeepSpeed model under stage 3 (so ZeRO-3 keeps its memory promise for both
    models), else the module itself, replicated, in the compute dtype."""
    import deepspeed

    module.requires_grad_(False)
    if cfg.zero_stage == 3:
        frozen, _, _, _ = deepspeed.initialize(
            model=module, config=deepspeed_config(cfg, bf16, stage=3, train=False)
        )
    else:
        frozen = module.to(device=device, dtype=torch.bfloat16 if bf16 else torch.float32)
    frozen.eval()
    return frozen


def grad_norm(model: Any) -> float:
    """The global gradient norm of the last step (before clipping), as DeepSpeed computed it."""
    norm = model.get_global_grad_norm()
    if norm is None:
        return float(getattr(model, "slime_grad_norm", math.nan))
    return float(norm.item() if isinstance(norm, torch.Tensor) else norm)


def _adamw(model: nn.Module, lr: float, cfg: TrainerConfig, split: Any = None) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm weights and biases are not decayed); `split`
    rearranges the param groups (expert parallelism puts experts into groups of their own)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    groups = [g for g in groups if g["params"]]
    if split is not None:
        groups = split(groups)
    # fused: one pass over each tensor, no temporaries (SmolLM2's 134M fp32 weights on 2 CPU threads:
    # 52 ms a step against 415 ms for the default loop; torch has fused kernels for CPU and CUDA).
    return torch.optim.AdamW(
        groups, lr=lr, betas=(float(cfg.betas[0]), float(cfg.betas[1])), eps=1e-8, fused=True
    )


def _plain_torch_step(stage: int, bf16: bool) -> bool:
    """True when DeepSpeed steps the client optimizer directly (no ZeRO or bf16 wrapper)."""
    return stage == 0 and not bf16


def _record_grad_norm(model: Any, grad_clip: float) -> None:
    """For `_plain_torch_step` models: clip the (already all-reduced) gradients right before the
    optimizer step and keep the pre-clip global norm in `model.slime_grad_norm`."""
    opt = model.optimizer
    real_step = opt.step

    def step(*args: Any, **kwargs: Any) -> Any:
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        max_norm = grad_clip if grad_clip > 0 else math.inf
        model.slime_grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        return real_step(*args, **kwargs)

    opt.step = step
