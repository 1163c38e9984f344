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
  other attention kernels (eager, flash-attention) train padded (trainer/rank.py says so).
- Position ids are each token's position in its own sequence, so rotary embeddings are unchanged.
- Prefix tree (`pack(..., share=True)`): rows that begin alike (a group's prompt, a system prompt
  every group shares, a reply sampled twice) share one segment for those tokens, and each segment
  that continues it also attends to all of it (`Packed.context`). A micro-batch of several GRPO
  groups then runs each prompt once, not once per row: on 8 prompts x 8 replies of 64 tokens with
  SmolLM2 the trainer step went from 26.3 s to 19.4 s (micro-batches of 8) and 18.1 s (16).
  Exact: a token's keys, values and logits depend only on the tokens before it, which every row
  sharing the token has in common.

`Packed` maps both ways: per-token outputs of the kept prediction columns come back into the [B, T]
layout of trainer.batching (`to_rows`), per-token inputs of that layout go into the packed order
(`kept`), and per-position tensors of the [B, L] layout (MoE routes) into the packed tokens (`tokens`).

`balance_tokens` assigns sequences to micro-batches by tokens, not by count: a packed micro-batch
costs its token count, not B x its longest row; with families (sequences of one prompt) it keeps a
family in one micro-batch where it fits, so the prefix tree can share its prompt. Ranks are already
balanced by tokens
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
    """The real tokens of a micro-batch's rows from column `first` on, in one row of N tokens, as
    segments: a row of its own, or (with `share`) a node of the rows' prefix tree.

    Packed token j stands for token `cols[j]` of row `rows[j]` of the padded micro-batch (for a
    token several rows share, the first of them). Segment s is packed positions
    cu_seqlens[s]:cu_seqlens[s+1]; its tokens attend causally to each other and to every token of
    `context[s]` (packed positions of the segments above it in the tree; None for none), plus a cached
    prefix of `first` tokens when the call passes one. `keep` [K] picks the packed positions whose
    logits the loss needs: the kept prediction columns (column t of the [B, T] layout is position
    start+t, trainer.batching) that are real, i.e. positions start..n-2 of a row of n tokens;
    `keep_rows`, `keep_cols` [K] are their places in [B, T]. A position shared by several rows is kept
    once per row (same logits, each row's own target).
    """

    input_ids: Tensor  # [1, N] int64
    position_ids: Tensor  # [1, N] int64: position of each token in its own sequence (= cols)
    rows: Tensor  # [N] int64
    cols: Tensor  # [N] int64
    cu_seqlens: Tensor  # [S + 1] int64: segment bounds in the packed row
    context: list[Tensor | None]  # per segment: [C_s] int64 packed positions it sees in full
    index: Tensor  # [B, L] int64: packed position of each row's token, -1 where not packed
    keep: Tensor  # [K] int64
    keep_rows: Tensor  # [K] int64
    keep_cols: Tensor  # [K] int64
    rows_shape: tuple[int, int]  # (B, T)
    shared_tokens: int  # tokens of the rows (from `first` on) that a shared segment stands for

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
        """[B, L, ...] per-position values (routes) -> [1, N, ...] of the packed tokens (a shared
        token takes the first sharing row's)."""
        return per_position[self.rows, self.cols].unsqueeze(0)

    def put_tokens(self, packed: Tensor, into: Tensor) -> Tensor:
        """Write [1, N, ...] per-token values back into every place of `into` [B, L, ...] they stand
        for (in place); returns `into`."""
        where = self.index >= 0  # [B, L]
        into[where] = packed[0][self.index[where]].to(into.dtype)
        return into

    @property
    def attention_pairs(self) -> int:
        """(query, key) pairs the packed tokens' attention computes, a cached prefix excluded."""
        total = 0
        bounds = self.cu_seqlens.tolist()
        for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            n, ctx = b - a, self.context[s]
            total += n * (n + 1) // 2 + n * (0 if ctx is None else ctx.numel())
        return total


def pack(input_ids: Tensor, lengths: Tensor, start: int, first: int = 0, share: bool = False) -> Packed:
    """Pack the real tokens (columns < lengths[b]) of every row of `input_ids` [B, L] from column
    `first` on; the kept prediction columns start at `start` (>= first, so they are all packed).

    Without `share` each row is one segment, rows in order. With `share` the rows become a prefix
    tree: the tokens a set of rows has in common (a group's prompt, a system prompt every group
    shares, identical replies) are one segment, packed once, before the segments that continue them
    (depth first, rows in order). Rows no longer than `first` contribute no tokens. Raises ValueError
    when start < first.
    """
    if start < first:
        raise ValueError(f"the kept columns start at {start}, before the packed ones ({first})")
    b, length = input_ids.shape
    device = input_ids.device
    ids = input_ids.cpu()
    lens = [int(n) for n in lengths.tolist()]
    index = torch.full((b, length), -1, dtype=torch.int64)
    spans: list[tuple[int, int, int]] = []  # per segment: (first sharing row, from column, to column)
    above: list[list[int]] = []  # per segment: the segments above it
    packed = 0

    def segment(rows: list[int], frm: int, to: int, parents: list[int]) -> None:
        nonlocal packed
        index[rows, frm:to] = torch.arange(packed, packed + to - frm)
        spans.append((rows[0], frm, to))
        above.append(parents)
        packed += to - frm

    todo = [r for r in range(b) if lens[r] > first]
    if not share:
        for r in todo:
            segment([r], first, lens[r], [])
    else:
        stack: list[tuple[list[int], int, list[int]]] = [(todo, first, [])] if todo else []
        while stack:
            rows, depth, parents = stack.pop()
            limit = min(lens[r] for r in rows)
            sub = ids[rows, depth:limit]  # [R, limit - depth]
            differ = (sub != sub[:1]).any(dim=0).nonzero()
            end = depth + int(differ[0, 0]) if differ.numel() else limit
            if end > depth:
                segment(rows, depth, end, parents)
                parents = [*parents, len(spans) - 1]
            children: dict[int, list[int]] = {}
            for r in rows:
                if lens[r] > end:
                    children.setdefault(int(ids[r, end]), []).append(r)
            for child in reversed(list(children.values())):  # popped in row order
                stack.append((child, end, parents))
    bounds = [0]
    for _, frm, to in spans:
        bounds.append(bounds[-1] + to - frm)
    rows_t = (
        torch.cat([torch.full((to - frm,), r, dtype=torch.int64) for r, frm, to in spans])
        if spans
        else (torch.zeros(0, dtype=torch.int64))
    )
    cols_t = (
        torch.cat([torch.arange(frm, to) for _, frm, to in spans])
        if spans
        else torch.zeros(0, dtype=torch.int64)
    )
    context = [
        torch.cat([torch.arange(bounds[p], bounds[p + 1]) for p in parents]).to(device) if parents else None
        for parents in above
    ]
    pos = torch.arange(length)
    # Position c of a row of n tokens predicts token c+1: kept for start <= c <= n-2.
    keep_mask = (pos >= start) & (pos < torch.tensor(lens)[:, None] - 1)  # [B, L]
    keep_rows, keep_pos = keep_mask.nonzero(as_tuple=True)
    real = sum(max(0, n - first) for n in lens)
    return Packed(
        input_ids=ids[rows_t, cols_t].unsqueeze(0).to(device),
        position_ids=cols_t.unsqueeze(0).to(device),
        rows=rows_t.to(device),
        cols=cols_t.to(device),
        cu_seqlens=torch.tensor(bounds, dtype=torch.int64, device=device),
        context=context,
        index=index.to(device),
        keep=index[keep_rows, keep_pos].to(device),
        keep_rows=keep_rows.to(device),
        keep_cols=(keep_pos - start).to(device),
        rows_shape=(b, length - 1 - start),
        shared_tokens=real - packed,
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
    packed segment on its own; otherwise transformers' sdpa unchanged.

    Packed: query [1, Hq, N, D], key/value [1, Hkv, P + N, D] where the first P keys are a cached
    prefix every segment follows (P = 0 without one). Segment s's queries attend causally to its own
    keys, and to all P prefix keys and the packed keys `slime_segment_context[s]` (positions in the
    packed row, the segments above s in `Packed`'s prefix tree; absent or None: none);
    `attention_mask` is ignored. Returns [1, N, Hq, D] as transformers' attention functions do.
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
    context = kwargs.get("slime_segment_context")
    gqa = query.shape[1] != key.shape[1]
    outs = []
    bounds = cu.tolist()
    for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        if b == a:
            continue
        q = query[:, :, a:b]  # [1, Hq, n, D]
        ks, vs = [key[:, :, prefix + a : prefix + b]], [value[:, :, prefix + a : prefix + b]]
        seen = context[s] if context is not None else None
        if seen is not None:  # the segments above this one, in front of its own keys
            ks.insert(0, key.index_select(2, seen + prefix))
            vs.insert(0, value.index_select(2, seen + prefix))
        if prefix:
            ks.insert(0, key[:, :, :prefix])
            vs.insert(0, value[:, :, :prefix])
        if len(ks) == 1:
            k, v, mask, causal = ks[0], vs[0], None, True
        else:
            k, v = torch.cat(ks, dim=2), torch.cat(vs, dim=2)  # [1, Hkv, C+n, D]
            # Query i (position C+i) sees the C context keys and its own keys 0..i: bottom-right causal.
            c = k.shape[2] - (b - a)
            mask = torch.ones(b - a, c + b - a, dtype=torch.bool, device=q.device).tril(c)
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


def balance_tokens(
    lengths: Sequence[int], parts: int, families: Sequence[int] | None = None, shared: Sequence[int] = ()
) -> list[list[int]]:
    """Assign items of token counts `lengths` to `parts` bins: each bin holds at most
    ceil(len / parts) items, and items go longest first to the bin with the fewest tokens so far
    (ties: the lower bin). Deterministic; each bin's indices in ascending order; bins may be empty
    when there are fewer items than bins.

    With `families` (a family id per item; `shared[f]`: the leading tokens family f's items have in
    common, which a packed forward runs once per bin), a family's items stay together: families go
    largest first (in tokens a bin computes), each onto the lightest bin with room, and only the part
    that does not fit moves on to the next lightest.
    """
    if parts <= 0:
        raise ValueError(f"parts must be > 0, got {parts}")
    capacity = max(1, math.ceil(len(lengths) / parts))
    fams = list(range(len(lengths))) if families is None else list(families)
    common = [0] * len(lengths) if families is None else list(shared)
    members: dict[int, list[int]] = {}
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        members.setdefault(fams[i], []).append(i)

    def cost(f: int, items: list[int]) -> int:
        return common[f] + sum(lengths[i] - common[f] for i in items)

    order = sorted(members, key=lambda f: (-cost(f, members[f]), members[f][0]))
    load = [0] * parts
    bins: list[list[int]] = [[] for _ in range(parts)]
    for f in order:
        items = members[f]
        while items:
            best = min((p for p in range(parts) if len(bins[p]) < capacity), key=lambda p: (load[p], p))
            take, items = items[: capacity - len(bins[best])], items[capacity - len(bins[best]) :]
            bins[best].extend(take)
            load[best] += cost(f, take)
    return [sorted(b) for b in bins]
