"""Delta weight pushes: a version sent as what changed since the engine's version (weights.delta).

A version lives in a flat buffer (slime/core/flat_buffer.py), cut into buckets of `bucket_bytes`. The
delta of version v against v - 1 is, per bucket, the XOR of their bytes: zero where nothing changed
(embeddings and norms under LoRA, frozen layers), and mostly zero high bytes where weights moved a
little (an optimizer step changes the low mantissa bits of a float, rarely its exponent). Buckets
whose XOR is all zero are not sent at all; the others are sent zstd-compressed. The engine XORs each
one into its copy of v - 1, and every bucket is then checked against the sender's checksum of v; a
mismatch raises (the engine is restarted and gets the full version).

Pure functions over numpy byte arrays; the broadcast transport (slime/core/transport_broadcast.py) moves the bytes.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

ZSTD_LEVEL = 1  # fast: a push must not wait long on compression


def buckets(nbytes: int, bucket_bytes: int) -> list[tuple[int, int]]:
    """(start, end) of each bucket of a buffer of `nbytes`."""
    return [(s, min(s + bucket_bytes, nbytes)) for s in range(0, nbytes, bucket_bytes)]


def checksums(buf: np.ndarray, bucket_bytes: int) -> list[int]:
    """CRC-32 of each bucket of `buf` (uint8 [n])."""
    return [zlib.crc32(memoryview(buf[s:e])) for s, e in buckets(buf.size, bucket_bytes)]


def encode(new: np.ndarray, base: np.ndarray, bucket_bytes: int) -> tuple[list[int], list[bytes]]:
    """The delta of `new` against `base` (both uint8 [n]): the indices of the buckets that differ and
    each one's XOR, zstd-compressed."""
    import zstandard

    if new.shape != base.shape:
        raise ValueError(f"delta needs buffers of one layout: {new.size} vs {base.size} bytes")
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    changed, payloads = [], []
    for i, (s, e) in enumerate(buckets(new.size, bucket_bytes)):
        diff = np.bitwise_xor(new[s:e], base[s:e])
        if not diff.any():
            continue
        changed.append(i)
        payloads.append(compressor.compress(memoryview(diff)))
    return changed, payloads


def apply(buf: np.ndarray, bucket_bytes: int, changed: Sequence[int], payloads: Sequence[bytes]) -> None:
    """XOR each changed bucket's decompressed delta into `buf` (uint8 [n], the base), in place."""
    import zstandard

    decompressor = zstandard.ZstdDecompressor()
    spans = buckets(buf.size, bucket_bytes)
    for i, payload in zip(changed, payloads, strict=True):
        s, e = spans[i]
        diff = np.frombuffer(decompressor.decompress(payload, max_output_size=e - s), dtype=np.uint8)
        if diff.size != e - s:
            raise ValueError(f"delta bucket {i}: {diff.size} bytes for a bucket of {e - s}")
        np.bitwise_xor(buf[s:e], diff, out=buf[s:e])


def verify(buf: np.ndarray, bucket_bytes: int, expected: Sequence[int]) -> list[int]:
    """Indices of the buckets of `buf` whose checksum is not `expected` ([] when all match)."""
    got = checksums(buf, bucket_bytes)
    if len(got) != len(expected):
        return list(range(len(got)))
    return [i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b]
