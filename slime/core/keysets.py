"""Compact coding of the key sets a sparse-attention indexer selects (DSA indexer replay).

A DeepSeek-sparse-attention (DSA) layer keeps, for the query at position t, the `topk` best-scoring of
its t + 1 causal keys. While t + 1 <= topk that is every key (a "dense" row: nothing to record, any
engine and trainer agree); from t = topk on it is exactly `topk` of them (a "selective" row). This
module codes the selective rows of one sequence as one byte stream, and back. Pure numpy.

The stream: rows in order, token by token and within a token layer by layer; each row is a set S of
`topk` distinct key positions of the query at position t, coded as distances back from the query
(d = t - position, so the most recent keys, which DSA keeps most often, are the smallest numbers) in
ascending order, as a header varint and then
- header 0, "gaps": the `topk` sorted distances as varints: the first, then each gap minus 1;
- header 2n + 1, "diff": S differs from the reference set R (the same layer's set at the previous
  token) by n added and n removed keys: n gap varints of the added distances, then n of the removed.
R is known when the previous token is a dense row (then R = all its keys: 0 .. topk - 1, because the
previous token's position is topk - 1) or a selective row that is also coded; otherwise only "gaps".
The encoder takes "diff" where it has fewer entries (2n < topk). Varints are LEB128 (7 bits a byte).

Why: "gaps" costs about one byte per key while the mean gap between kept keys stays below 128
(contexts up to ~128 x topk): a quarter of int32 positions and half of uint16. Consecutive queries of
a trained DSA model keep many of the same keys (attention sinks, the local window, salient tokens),
which "diff" rows store as only what changed: a sliding window is 3 bytes a row (the query itself added
at distance 0, the key that left at distance topk removed). docs/moe.md has the figures measured on glm5_dsa_tiny.
"""

from __future__ import annotations

import numpy as np

_MAX_VARINT_BYTES = 9  # 63 bits: any position or count


def varint_encode(values: np.ndarray) -> np.ndarray:
    """Non-negative integers [N] -> their LEB128 bytes, concatenated (uint8 [M])."""
    v = np.asarray(values, dtype=np.uint64).reshape(-1)
    if v.size == 0:
        return np.zeros(0, dtype=np.uint8)
    nbytes = np.ones(v.shape, dtype=np.int64)
    for k in range(1, _MAX_VARINT_BYTES):
        nbytes += v >= np.uint64(1 << (7 * k))
    which = np.repeat(np.arange(v.size), nbytes)  # value of each output byte
    first = np.cumsum(nbytes) - nbytes
    j = np.arange(which.size) - first[which]  # byte index within its value
    out = (v[which] >> (np.uint64(7) * j.astype(np.uint64))) & np.uint64(0x7F)
    more = j < nbytes[which] - 1
    return (out | (more.astype(np.uint64) << np.uint64(7))).astype(np.uint8)


def varint_decode(data: bytes | np.ndarray) -> np.ndarray:
    """LEB128 bytes -> the integers they code (int64 [N]). ValueError on a truncated stream."""
    b = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes | bytearray) else np.asarray(data)
    if b.size == 0:
        return np.zeros(0, dtype=np.int64)
    last = (b & 0x80) == 0
    if not last[-1]:
        raise ValueError("varint stream ends inside a value")
    which = np.concatenate([[0], np.cumsum(last[:-1])])  # value index of each byte
    ends = np.flatnonzero(last)
    first = np.concatenate([[0], ends[:-1] + 1])
    shift = (7 * (np.arange(b.size) - first[which])).astype(np.uint64)
    parts = (b & 0x7F).astype(np.uint64) << shift
    out = np.zeros(ends.size, dtype=np.uint64)
    np.add.at(out, which, parts)  # the parts of one value occupy disjoint bits: add == or
    return out.astype(np.int64)


def _gaps(sorted_rows: np.ndarray) -> np.ndarray:
    """[N, K] ascending positions -> [N, K] the first position, then each gap minus 1 (>= 0)."""
    g = np.empty_like(sorted_rows)
    g[:, :1] = sorted_rows[:, :1]
    g[:, 1:] = np.diff(sorted_rows, axis=1) - 1
    return g


def _ungap(gaps: np.ndarray) -> np.ndarray:
    return np.cumsum(gaps + 1) - 1


def encode(sel: np.ndarray, positions: np.ndarray, topk: int, use_diff: bool = True) -> bytes:
    """Code the selective rows of one sequence (see the module docstring); `use_diff=False` codes
    every row as "gaps" (to measure what diff rows save).

    sel: [R, L, K] integer key positions (any order within a row; K == topk, distinct per row), the
        selections of R selective tokens x L indexer layers, tokens ascending;
    positions: [R] the tokens' positions in the sequence (each >= topk, ascending).
    """
    sel = np.asarray(sel, dtype=np.int64)
    positions = np.asarray(positions, dtype=np.int64)
    r, layers, k = sel.shape if sel.ndim == 3 else (0, 0, topk)
    if r == 0:
        return b""
    if k != topk or positions.shape != (r,):
        raise ValueError(f"keysets.encode: sel {sel.shape} and positions {positions.shape} for topk {topk}")
    t = positions[:, None, None]
    # The reference of each row: the previous token's set of the same layer, when that token is the
    # previous position and coded, or all keys of the last dense row.
    ref = sel.copy()  # row 0 (no previous token) is never coded as a diff
    ref[1:] = sel[:-1]
    has_ref = np.zeros(r, dtype=bool)
    has_ref[1:] = positions[1:] == positions[:-1] + 1
    first = positions == topk
    ref[first] = np.arange(topk)
    has_ref |= first
    # Distances back from each row's query, ascending (a row without reference: any non-negative values).
    s = np.sort(t - sel, axis=-1)
    ref = np.sort(np.abs(t - ref), axis=-1)
    n = r * layers
    s2, ref2 = s.reshape(n, k), ref.reshape(n, k)
    # Row-wise membership in one isin: offset every row into its own range of values.
    span = int(max(s2.max(), ref2.max())) + 1
    offset = (np.arange(n, dtype=np.int64) * span)[:, None]
    in_ref = np.isin(s2 + offset, ref2 + offset)  # [N, K] kept keys of S
    in_s = np.isin(ref2 + offset, s2 + offset)  # [N, K] keys of R still in S
    added = k - in_ref.sum(axis=1)  # == removed: |S| = |R| = k
    diff = np.repeat(has_ref, layers) & (2 * added < k) & use_diff
    # Each row as [header | K "A" entries | K "B" entries] with a keep mask; flattened row-major, the
    # kept entries are exactly the stream: gaps rows keep all of A, diff rows n of A and n of B.
    order_a = np.argsort(in_ref, axis=1, kind="stable")  # added keys first, ascending
    order_b = np.argsort(in_s, axis=1, kind="stable")  # removed keys first, ascending
    a_diff = _gaps(np.take_along_axis(s2, order_a, axis=1))
    b_diff = _gaps(np.take_along_axis(ref2, order_b, axis=1))
    a = np.where(diff[:, None], a_diff, _gaps(s2))
    header = np.where(diff, 2 * added + 1, 0)
    cols = np.arange(k)[None, :]
    keep_a = ~diff[:, None] | (cols < added[:, None])
    keep_b = diff[:, None] & (cols < added[:, None])
    values = np.concatenate([header[:, None], a, b_diff], axis=1)
    keep = np.concatenate([np.ones((n, 1), dtype=bool), keep_a, keep_b], axis=1)
    return varint_encode(values[keep]).tobytes()


def decode(data: bytes, positions: np.ndarray, num_layers: int, topk: int) -> np.ndarray:
    """The [R, L, K] int64 key positions (ascending) `encode(sel, positions, topk)` coded."""
    positions = np.asarray(positions, dtype=np.int64)
    r = positions.shape[0]
    out = np.empty((r, num_layers, topk), dtype=np.int64)
    if r == 0:
        return out
    values = varint_decode(data)
    flat = out.reshape(r * num_layers, topk)
    dense_ref = np.arange(topk)
    pos = 0
    for row in range(r):
        t = int(positions[row])
        for layer in range(num_layers):
            i = row * num_layers + layer
            if pos >= values.size:
                raise ValueError("keysets.decode: the stream ends before the last row")
            header = int(values[pos])
            pos += 1
            if header == 0:
                dist = _ungap(values[pos : pos + topk])
                pos += topk
            else:
                n = header >> 1
                if t == topk:
                    ref = t - dense_ref
                elif row > 0 and positions[row - 1] == t - 1:
                    ref = t - flat[i - num_layers]
                else:
                    raise ValueError(f"keysets.decode: a diff row at position {t} has no reference")
                add = _ungap(values[pos : pos + n])
                rem = _ungap(values[pos + n : pos + 2 * n])
                pos += 2 * n
                dist = np.concatenate([ref[~np.isin(ref, rem)], add])
            if dist.shape[0] != topk:
                raise ValueError(
                    f"keysets.decode: a row at position {t} has {dist.shape[0]} keys, not {topk}"
                )
            flat[i] = np.sort(t - dist)
    if pos != values.size:
        raise ValueError(f"keysets.decode: {values.size - pos} values left over (wrong positions or topk)")
    return out
