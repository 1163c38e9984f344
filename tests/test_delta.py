"""Delta weight pushes (slime/core/delta.py, the broadcast transport with weights.delta): what changed
is sent as compressed XOR per bucket, unchanged buckets not at all, and a wrong base is caught by the
checksums. The last test runs a real gloo broadcast group (sender and receiver in one process)."""

from __future__ import annotations

import asyncio

import numpy as np
import torch

from slime.core import delta
from slime.core.transport import for_engine
from slime.core.transport_broadcast import BroadcastReceiver, BroadcastSender


def test_xor_delta_roundtrip_skips_unchanged_buckets():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=10_000, dtype=np.uint8)
    new = base.copy()
    new[2_500:2_510] ^= 1  # bucket 2 of 1,000-byte buckets
    new[9_999] = 7 if base[9_999] != 7 else 8  # bucket 9
    changed, payloads = delta.encode(new, base, 1_000)
    assert changed == [2, 9]
    held = base.copy()
    delta.apply(held, 1_000, changed, payloads)
    assert np.array_equal(held, new)
    assert delta.verify(held, 1_000, delta.checksums(new, 1_000)) == []


def test_a_wrong_base_fails_its_checksums():
    base = np.zeros(4_000, dtype=np.uint8)
    new = base.copy()
    new[100] = 1
    changed, payloads = delta.encode(new, base, 1_000)
    stale = base.copy()
    stale[3_500] = 9  # the engine's copy differs from the sender's base in bucket 3
    delta.apply(stale, 1_000, changed, payloads)
    assert delta.verify(stale, 1_000, delta.checksums(new, 1_000)) == [3]


def test_a_small_optimizer_step_compresses():
    """fp32 weights moved by ~1e-4 relative: their sign and exponent bytes mostly stay, so the XOR
    is mostly zero bytes and compresses well below the full size."""
    w = torch.randn(256, 1024)
    before = w.numpy().view(np.uint8).ravel().copy()
    after = (w + 1e-4 * w.abs() * torch.randn_like(w)).numpy().view(np.uint8).ravel()
    changed, payloads = delta.encode(after, before, 1 << 20)
    assert changed == [0] and sum(len(p) for p in payloads) < 0.75 * after.size


async def test_broadcast_delta_push_matches_the_full_version(tmp_path):
    sender = BroadcastSender(
        str(tmp_path), bucket_mb=1, backend="gloo", timeout_s=60, host="127.0.0.1", delta=True
    )
    try:
        channel = for_engine(sender.channel, "e", 1)
        _, receiver = await asyncio.gather(
            asyncio.to_thread(sender.accept, "e", 1), asyncio.to_thread(BroadcastReceiver, channel, 1)
        )
        emb = torch.randn(1000, 300)  # 1.2 MB: two buckets, unchanged by the "step"
        head = torch.randn(300, 300)

        async def push(tensors, version, delta_keys):
            manifest = sender.publish(tensors, version)
            _, got = await asyncio.gather(
                asyncio.to_thread(sender.send, manifest, ["e"], delta_keys),
                asyncio.to_thread(receiver.receive, manifest),
            )
            return {n: t.clone() for n, t in got}

        first = await push([("emb", emb), ("head", head)], 1, ["e"])  # no version 0: full
        assert sender.last_send["full_engines"] == 1.0 and torch.equal(first["head"], head)
        head2 = head + 0.01
        second = await push([("emb", emb), ("head", head2)], 2, ["e"])
        assert sender.last_send["delta_engines"] == 1.0
        assert 0 < sender.last_send["delta_bytes"] < 0.5 * sender.last_send["full_bytes"]
        assert torch.equal(second["emb"], emb) and torch.equal(second["head"], head2)
        # An engine the push does not list as holding the previous version gets the full version.
        third = await push([("emb", emb * 2), ("head", head2)], 3, [])
        assert sender.last_send["full_engines"] == 1.0 and torch.equal(third["emb"], emb * 2)
    finally:
        sender.close()


async def test_an_engine_without_the_base_refuses_a_delta(tmp_path):
    """The engine missed version 2; a delta for version 3 (against 2) is refused before it is applied,
    and the sender reports that engine as failed (the push then restarts it: a full version)."""
    sender = BroadcastSender(
        str(tmp_path), bucket_mb=1, backend="gloo", timeout_s=5, host="127.0.0.1", delta=True
    )
    try:
        channel = for_engine(sender.channel, "e", 1)
        _, receiver = await asyncio.gather(
            asyncio.to_thread(sender.accept, "e", 1), asyncio.to_thread(BroadcastReceiver, channel, 1)
        )
        w = torch.randn(600, 600)
        m1 = sender.publish([("w", w)], 1)
        await asyncio.gather(
            asyncio.to_thread(sender.send, m1, ["e"]), asyncio.to_thread(receiver.receive, m1)
        )
        sender.publish([("w", w + 1)], 2)  # never sent to this engine
        m3 = sender.publish([("w", w + 2)], 3)
        failed, refused = await asyncio.gather(
            asyncio.to_thread(sender.send, m3, ["e"], ["e"]),
            asyncio.to_thread(receiver.receive, m3),
            return_exceptions=True,
        )
        assert isinstance(refused, RuntimeError) and "needs version 2; this engine holds 1" in str(refused)
        assert list(failed) == ["e"]
    finally:
        sender.close()
