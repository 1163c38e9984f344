"""Model FLOPs of the trainer's forwards and the machine's peak matmul rate: `perf/mfu`.

Counting (FLOPs = 2 per multiply-add; the usual 6N rule with an attention term):

- A token passing through the model body costs 2 x `ModelFlops.body_params`: every weight outside
  the input embedding and the output head, MoE routed experts counted at top_k / num_experts (the
  share a token uses). Norms and biases are included (negligible).
- A position whose logits are computed costs 2 x hidden x vocab (`head_params`, tied or not).
- Attention costs 4 x heads x head_dim per (query, key) pair per layer (scores and the weighted
  sum); causal, so a sequence of n tokens has n(n+1)/2 pairs.
- A backward costs twice its forward, so a training forward counts 3x.

`forward_flops` counts what the trainer's forward of a micro-batch needs, whatever it executes: real
tokens only (padding is waste, not model work), the shared prefix once, logits of the kept columns
only (`packed_flops`: a packed forward's tokens, a token that several rows share once). MFU = those
FLOPs over the step's seconds, over the peak matmul FLOP/s measured on the same
device, dtype and threads at start-up (`measure_peak_flops`): a measured peak, not a datasheet's.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ModelFlops:
    """What a decoder-only LM's tokens cost (see the module docstring)."""

    body_params: float  # weights a token multiplies through, embedding and head excluded
    head_params: int  # hidden x vocab
    layers: int
    attn_width: int  # attention heads x head dim

    def train_flops_per_token(self, seq_len: int) -> float:
        """FLOPs per trained token (forward and backward, logits at every position) of a sequence of
        `seq_len` tokens: 6 x (body + head) + 12 x layers x width x (seq_len + 1) / 2, the last term
        being the mean causal context."""
        return 6.0 * (self.body_params + self.head_params) + 12.0 * self.layers * self.attn_width * (
            (seq_len + 1) / 2
        )


def model_flops(model: Any) -> ModelFlops:
    """`ModelFlops` of a transformers causal LM (dense or MoE: routed experts are the parameters
    under an `experts` module, counted at `num_experts_per_tok` over the expert count)."""
    cfg = model.config
    head = model.get_output_embeddings()
    excluded = {id(p) for p in model.get_input_embeddings().parameters()} | {id(p) for p in head.parameters()}
    num_experts = getattr(cfg, "num_experts", None) or getattr(cfg, "n_routed_experts", None) or 0
    top_k = getattr(cfg, "num_experts_per_tok", None) or 0
    body = 0.0
    for name, p in model.named_parameters():
        if id(p) in excluded:
            continue
        routed = num_experts and ".experts." in f".{name}"
        body += p.numel() * (top_k / num_experts if routed else 1.0)
    heads = int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    return ModelFlops(
        body_params=body,
        head_params=int(head.weight.numel()),
        layers=int(cfg.num_hidden_layers),
        attn_width=heads * head_dim,
    )


def forward_flops(m: ModelFlops, lengths: Sequence[int], start: int, prefix: int) -> float:
    """FLOPs one forward over a micro-batch needs: rows of `lengths` real tokens, logits at positions
    start..n-2 of each row (trainer.batching's kept columns), the first `prefix` tokens (shared by
    every row) run once when prefix > 0, plus that forward's one logit."""
    body = sum(lengths) - prefix * (len(lengths) - 1)
    logits = sum(max(0, n - 1 - start) for n in lengths) + (1 if prefix else 0)
    shared = prefix * (prefix + 1) // 2
    pairs = shared + sum(n * (n + 1) // 2 - shared for n in lengths)
    return 2.0 * (m.body_params * body + m.head_params * logits) + 4.0 * m.layers * m.attn_width * pairs


def packed_flops(m: ModelFlops, pk: Any) -> float:
    """FLOPs of one packed forward (`trainer.packing.Packed` `pk`): every packed token through the
    body once (a token several rows share counts once), logits at its kept positions, attention over
    its segments' (query, key) pairs."""
    tokens = int(pk.input_ids.shape[1])
    return 2.0 * (m.body_params * tokens + m.head_params * int(pk.keep.numel())) + (
        4.0 * m.layers * m.attn_width * pk.attention_pairs
    )


def measure_peak_flops(dtype: torch.dtype, device: torch.device, budget_s: float = 0.3) -> float:
    """Peak matmul FLOP/s of square `dtype` matmuls on `device` with the current thread count: the
    best of a few (at least 3, for about `budget_s` seconds) after a warm-up. 1024 x 1024 on a CPU
    (tens of ms each), 8192 x 8192 on a GPU (large enough to saturate it)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch.mm(a, b)
    sync()
    best, reps, until = float("inf"), 0, time.perf_counter() + budget_s
    while reps < 3 or time.perf_counter() < until:
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - t0)
        reps += 1
    return 2.0 * n**3 / best
