"""Zero-copy weight loads for a vLLM CPU engine: its parameters become views of the trainer's slot.

Why: vLLM's in-place reload on CPU materialises every layer in fresh memory, copies the new weights
in, and repacks every linear weight into oneDNN's blocked layout (`create_onednn_mm`): about 7x a
memory copy for SmolLM2, plus 2x for the tied head (docs/benchmarks.md). The trainer already writes
each version into one of two shared-memory slots that the engine maps (slime/core/transport_shm.py).
With `weights.cpu_alias`, the engine's parameters become views of the slot and its linear layers multiply
with torch's `F.linear` on those plain weights, so loading a version is pointing every parameter at
the other slot: no copy, no repack. The cost is decode speed where oneDNN's packed GEMM beats torch's
(measured in docs/benchmarks.md).

Contract with the trainer's slot layout (`slime.core.flat_buffer.plan_layout`): the tensors of one fused vLLM
parameter (q/k/v into `qkv_proj`, gate/up into `gate_up_proj`, as the model's
`packed_modules_mapping` lists them) lie next to each other in that order with no padding between
them, in the engine's dtype. The two slots alternate, and a slot is written only after every live
engine loaded the newer one, so the slot an engine reads is never written under it.

Where it cannot apply (tensor parallelism, MoE experts, quantised layers, a parameter the push does
not carry, a layout that does not fit), `plan_aliases` returns the reason and the engine keeps
vLLM's reload.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# (module, parameter attribute, the new parameter over the slot)
Binding = tuple[torch.nn.Module, str, torch.nn.Parameter]


@dataclass
class AliasPlan:
    """Every parameter of the model bound to a view of one slot, and the linear layers to switch."""

    bindings: list[Binding]
    linears: list[torch.nn.Module]  # modules whose `cpu_linear` becomes torch's F.linear

    def apply(self) -> None:
        """Point the model at this slot (in place; the old parameters are dropped)."""
        for module, attr, param in self.bindings:
            module._parameters[attr] = param
        for module in self.linears:
            module.cpu_linear = _plain_linear


def _plain_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.nn.functional.linear(x, weight, bias)


def _joined(views: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """One tensor over adjacent same-dtype views of one buffer, concatenated along dim 0 (None when
    they are not back to back or their trailing dims differ)."""
    first = views[0]
    for a, b in zip(views, views[1:], strict=False):
        if (
            b.dtype != first.dtype
            or b.shape[1:] != first.shape[1:]
            or not (a.is_contiguous() and b.is_contiguous())
            or a.data_ptr() + a.numel() * a.element_size() != b.data_ptr()
        ):
            return None
    if len(views) == 1:
        return first
    rows = sum(int(v.shape[0]) for v in views)
    out = torch.empty(0, dtype=first.dtype)
    return out.set_(first.untyped_storage(), first.storage_offset(), (rows, *first.shape[1:]))


def _expected_shape(module: torch.nn.Module, attr: str, param: torch.Tensor) -> tuple[int, ...]:
    """The parameter's logical shape: the CPU linear path drops a packed weight to an empty tensor,
    whose shape then comes from the layer's partition sizes."""
    if attr == "weight" and param.numel() == 0 and hasattr(module, "output_size_per_partition"):
        return (int(module.output_size_per_partition), int(module.input_size_per_partition))
    return tuple(param.shape)


def plan_aliases(model: torch.nn.Module, views: dict[str, torch.Tensor]) -> AliasPlan | str:
    """Bind every parameter of `model` to its tensors in `views` (checkpoint names -> views of one
    slot); returns the plan, or why it cannot be done."""
    packed: dict[str, list[str]] = dict(getattr(model, "packed_modules_mapping", None) or {})
    bound: dict[int, torch.nn.Parameter] = {}  # id of an old parameter -> its new one (tied weights)
    bindings: list[Binding] = []
    linears: list[torch.nn.Module] = []
    for mname, module in model.named_modules(remove_duplicate=False):
        kind = type(module).__name__
        if "moe" in kind.lower() or "expert" in kind.lower():
            return f"{mname} is {kind}: MoE experts keep vLLM's reload"
        if getattr(module, "tp_size", 1) != 1:
            return f"{mname} is split over tensor-parallel ranks"
        if hasattr(module, "cpu_linear"):
            linears.append(module)
        for attr, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) in bound:  # a tied weight, bound through its first owner
                bindings.append((module, attr, bound[id(param)]))
                continue
            full = f"{mname}.{attr}" if mname else attr
            leaf = mname.rsplit(".", 1)[-1]
            prefix = mname[: len(mname) - len(leaf)]
            sources = [f"{prefix}{s}.{attr}" for s in packed[leaf]] if leaf in packed else [full]
            missing = [s for s in sources if s not in views]
            if missing:
                return f"{full}: the pushed weights have no {', '.join(missing)}"
            view = _joined([views[s] for s in sources])
            if view is None:
                return f"{full}: {', '.join(sources)} are not back to back in the slot"
            want = _expected_shape(module, attr, param)
            if tuple(view.shape) != want or view.dtype != param.dtype:
                return (
                    f"{full}: the slot holds {tuple(view.shape)} {view.dtype}, the engine "
                    f"{want} {param.dtype}"
                )
            new = torch.nn.Parameter(view, requires_grad=False)
            bound[id(param)] = new
            bindings.append((module, attr, new))
    return AliasPlan(bindings, linears)
