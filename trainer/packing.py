"""Packing a micro-batch's sequences into one row without padding, and their outputs back.

A padded micro-batch (trainer.batching) has B rows of L tokens, padding on the right. Packed, the real
tokens of every row, from column `first` on, lie end to end in one row of N tokens: the model runs no
padding, not in its matmuls nor in its attention. Attention stays within each sequence:

- `SEGMENT_ATTENTION` is a transformers attention implementation that runs sdpa once per packed
  sequence (causal within it, plus every key of a cached shared prefix) when the model call carries
  `cu_seq_lens_q`, and plain sdpa otherwise. `use_segment_attention` switches an sdpa model to it.
  transformers' own packed-sequence support for sdpa (position ids restarting at 0, no attention mask)
  builds one [N, N] block-diagonal mask and computes all N^2 scores: 10-12x slower than one causal
  sdpa call per sequence for 8 x 430 tokens on this CPU (`python -m benchmarks.packing`). Models on
  other attention kernels (eager, flash-attention) train padded (trainer/worker.py says so).
- Position ids are each token's position in its own sequence, so rotary embeddings are unchanged.

`Packed` maps both ways: per-token outputs of the kept prediction columns come back into the [B, T]
layout of trainer.batching (`to_rows`), per-token inputs of that layout go into the packed order
(`kept`), and per-position tensors of the [B, L] layout (MoE routes) into the packed tokens (`tokens`).

`balance_tokens` assigns sequences to micro-batches by tokens, not by count: a packed micro-batch
costs its token count, not B x its longest row. Ranks are already balanced by tokens
(`trainer.batching.shard_groups`).

Tensors in, tensors out (no model, no DeepSpeed); unit-tested in tests/test_packing.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

SEGMENT_ATTENTION = "slime_segments"


@dataclass
class Packed:
    """The real tokens of a micro-batch's rows from column `first` on, row after row, in one row.

    Packed token j is token `cols[j]` of row `rows[j]` of the padded micro-batch. `keep` [K] picks
    the packed positions whose logits the loss needs: the kept prediction columns (column t of the
    [B, T] layout is position start+t, trainer.batching) that are real, i.e. positions start..n-2 of
    a row of n tokens; `keep_rows`, `keep_cols` [K] are their places in [B, T].
    """

    input_ids: Tensor  # [1, N] int64
    position_ids: Tensor  # [1, N] int64: position of each token in its own sequence (= cols)
    rows: Tensor  # [N] int64
    cols: Tensor  # [N] int64
    cu_seqlens: Tensor  # [B + 1] int64: row b's tokens are packed positions cu_seqlens[b]:cu_seqlens[b+1]
    keep: Tensor  # [K] int64
    keep_rows: Tensor  # [K] int64
    keep_cols: Tensor  # [K] int64
    rows_shape: tuple[int, int]  # (B, T)

    def to_rows(self, values: Tensor) -> Tensor:
        """Kept per-token values [1, K, ...] -> [B, T, ...], zero on the columns no row keeps
        (padding, and positions past a row's end). Differentiable."""
        flat = values.reshape(values.shape[1:]) if values.dim() > 1 else values  # [K, ...]
        out = flat.new_zeros((*self.rows_shape, *flat.shape[1:]))
        return out.index_put((self.keep_rows, self.keep_cols), flat)

    def kept(self, per_column: Tensor) -> Tensor:
        """[B, T, ...] per-column values (targets, masks) -> [1, K, ...] in packed order."""
        return per_column[self.keep_rows, self.keep_cols].unsqueeze(0)

    def tokens(self, per_position: Tensor) -> Tensor:
        """[B, L, ...] per-position values (routes) -> [1, N, ...] of the packed tokens."""
        return per_position[self.rows, self.cols].unsqueeze(0)

    def put_tokens(self, packed: Tensor, into: Tensor) -> Tensor:
        """Write [1, N, ...] per-token values back into their places of `into` [B, L, ...] (in
        place); returns `into`."""
        into[self.rows, self.cols] = packed[0].to(into.dtype)
        return into


def pack(input_ids: Tensor, lengths: Tensor, first: int, start: int) -> Packed:
    """Pack the real tokens (columns < lengths[b]) of every row of `input_ids` [B, L] from column
    `first` on; the kept prediction columns start at `start` (>= first, so they are all packed).

    Rows shorter than `first` contribute no tokens. Raises ValueError when start < first.
    """
    if start < first:
        raise ValueError(f"the kept columns start at {start}, before the packed ones ({first})")
    b, length = input_ids.shape
    device = input_ids.device
    lengths = lengths.to(device)
    pos = torch.arange(length, device=device)  # [L]
    real = (pos >= first) & (pos < lengths[:, None])  # [B, L]
    rows, cols = real.nonzero(as_tuple=True)  # [N] each, row-major: rows in order, columns in order
    counts = real.sum(dim=1)  # [B]
    cu = torch.zeros(b + 1, dtype=torch.int64, device=device)
    cu[1:] = counts.cumsum(0)
    index = torch.full((b, length), -1, dtype=torch.int64, device=device)
    index[rows, cols] = torch.arange(rows.numel(), device=device)
    # Position c of a row of n tokens predicts token c+1: kept for start <= c <= n-2.
    keep_mask = (pos >= start) & (pos < lengths[:, None] - 1)  # [B, L]
    keep_rows, keep_pos = keep_mask.nonzero(as_tuple=True)
    return Packed(
        input_ids=input_ids[rows, cols].unsqueeze(0),
        position_ids=cols.unsqueeze(0),
        rows=rows,
        cols=cols,
        cu_seqlens=cu,
        keep=index[keep_rows, keep_pos],
        keep_rows=keep_rows,
        keep_cols=keep_pos - start,
        rows_shape=(b, length - 1 - start),
    )


# --------------------------------------------------------------------------------------------------
# Attention within packed sequences
# --------------------------------------------------------------------------------------------------


def segment_attention(
    module: Any,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers attention function: with `cu_seq_lens_q` [S + 1] (a packed call), sdpa over each
    packed sequence on its own; otherwise transformers' sdpa unchanged.

    Packed: query [1, Hq, N, D], key/value [1, Hkv, P + N, D] where the first P keys are a cached
    prefix every sequence follows (P = 0 without one). Sequence s's queries attend causally to its own
    keys and to all P prefix keys; `attention_mask` is ignored. Returns [1, N, Hq, D] as transformers'
    attention functions do.
    """
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if query.shape[0] != 1:
        raise ValueError(f"a packed attention call has one row, got {query.shape[0]}")
    prefix = key.shape[2] - query.shape[2]
    gqa = query.shape[1] != key.shape[1]
    outs = []
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        if b == a:
            continue
        q = query[:, :, a:b]  # [1, Hq, n, D]
        if prefix == 0:
            k, v, mask, causal = key[:, :, a:b], value[:, :, a:b], None, True
        else:
            k = torch.cat([key[:, :, :prefix], key[:, :, prefix + a : prefix + b]], dim=2)  # [1, Hkv, P+n, D]
            v = torch.cat([value[:, :, :prefix], value[:, :, prefix + a : prefix + b]], dim=2)
            # Query i (position P+i) sees the prefix and its own keys 0..i: bottom-right causal.
            mask = torch.ones(b - a, prefix + b - a, dtype=torch.bool, device=q.device).tril(prefix)
            causal = False
        outs.append(
            F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal, scale=scaling, enable_gqa=gqa
            )
        )
    out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]  # [1, Hq, N, D]
    return out.transpose(1, 2).contiguous(), None


def use_segment_attention(model: Any) -> bool:
    """Switch a transformers model (or a DeepSpeed engine around one) whose attention is sdpa to
    `SEGMENT_ATTENTION`, registering it with transformers once; unpacked calls still run sdpa with
    sdpa's masks. Returns whether the model now uses it (False for eager, flash or other kernels)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if SEGMENT_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(SEGMENT_ATTENTION, segment_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(SEGMENT_ATTENTION, sdpa_mask)
    module = getattr(model, "module", model)
    impl = module.config._attn_implementation
    if impl == "sdpa":
        module.set_attn_implementation(SEGMENT_ATTENTION)
        impl = module.config._attn_implementation
    return impl == SEGMENT_ATTENTION


def uses_segment_attention(model: Any) -> bool:
    """Whether `model` (or the module inside a DeepSpeed engine) runs `SEGMENT_ATTENTION`."""
    config = getattr(getattr(model, "module", model), "config", None)
    return getattr(config, "_attn_implementation", None) == SEGMENT_ATTENTION


def placeholder_mask(device: torch.device) -> Tensor:
    """The attention mask packed calls pass: [1, 1, 1, 1] True. A 4-D mask makes transformers' mask
    builders return it as it is (`segment_attention` ignores it in packed calls) instead of
    materialising an [N, N] one."""
    return torch.ones((1, 1, 1, 1), dtype=torch.bool, device=device)


# --------------------------------------------------------------------------------------------------
# Balancing micro-batches by tokens
# --------------------------------------------------------------------------------------------------


def balance_tokens(lengths: Sequence[int], parts: int) -> list[list[int]]:
    """Assign items of token counts `lengths` to `parts` bins: each bin holds at most
    ceil(len / parts) items, and items go longest first to the bin with the fewest tokens so far
    (ties: the lower bin). Deterministic; each bin's indices in ascending order; bins may be empty
    when there are fewer items than bins."""
    if parts <= 0:
        raise ValueError(f"parts must be > 0, got {parts}")
    capacity = max(1, math.ceil(len(lengths) / parts))
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    load = [0] * parts
    bins: list[list[int]] = [[] for _ in range(parts)]
    for i in order:
        best = min((p for p in range(parts) if len(bins[p]) < capacity), key=lambda p: (load[p], p))
        bins[best].append(i)
        load[best] += lengths[i]
    return [sorted(b) for b in bins]
