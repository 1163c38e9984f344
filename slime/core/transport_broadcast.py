"""The broadcast weight transport: each version sent over a torch.distributed group per engine.

weights.transport=broadcast, for engines on other nodes than trainer rank 0. `BroadcastSender.publish`
writes the version into the next of its two slots as shm does (`_publish`, slime/core/transport_shm.py;
kept there for re-sends to restarted engines); `send` broadcasts its bytes in chunks of
`trainer.weight_bucket_mb` over one group per engine: trainer rank 0 (group rank 0) and the engine's
workers (ranks 1.., one per tensor-parallel worker), gloo on CPU, NCCL on GPUs, set up on a TCPStore
that rank 0 hosts (`_new_group`). A group per engine, so an engine that restarts joins a group of its
own and is sent the last version alone; gloo's broadcast sends from the root to every peer anyway.
`BroadcastReceiver` joins its group and receives into a flat buffer of its own (allocated once and
reused). Nothing but bytes and the layout cross: no file path. With weights.delta an engine that
serves the previous version is sent only the changed buckets (slime/core/delta.py); the wire format
is on `BroadcastSender`.

Contract: `BroadcastSender` is a `WeightSender` and `BroadcastReceiver` a `WeightReceiver` (the
protocols and the dispatch that opens them: slime/core/transport.py). `send` reports the engines it
lost instead of raising, so one dead engine never cuts the others off. Nothing here imports torch at
import time.
"""

from __future__ import annotations

import datetime
import socket
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from slime.core.checkpoint import MiB
from slime.core.config import Transport
from slime.core.flat_buffer import WeightSlots, flat_views, layout_bytes
from slime.core.transport_shm import _publish
from slime.core.types import WeightChannel, WeightManifest

if TYPE_CHECKING:
    import torch


class BroadcastSender:
    """weights.transport=broadcast: one process group per engine on a TCPStore hosted here.

    Each version goes to an engine as a header, int64 [mode, changed buckets, payload bytes], then
    either every byte of the flat buffer (mode 0: a full push) or, with `delta` and an engine that
    serves the previous version, a table of (bucket, compressed size) and the compressed XOR of the
    buckets that changed (mode 1; slime/core/delta.py), in chunks of `bucket_mb`."""

    def __init__(
        self,
        weights_dir: str,
        bucket_mb: int,
        backend: str,
        timeout_s: float,
        host: str | None = None,
        delta: bool = False,
    ) -> None:
        import torch.distributed as dist

        self.slots = WeightSlots(weights_dir)
        self.bucket_bytes = max(1, bucket_mb) * MiB
        self.backend = backend
        self.delta = delta
        self.timeout = datetime.timedelta(seconds=timeout_s)
        host = host or _outgoing_ip()
        self.store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False, timeout=self.timeout)
        self.channel = WeightChannel(
            transport=Transport.broadcast.value,
            host=host,
            port=int(self.store.port),
            backend=backend,
            timeout_s=timeout_s,
        )
        self.groups: dict[str, object] = {}
        self._slot_of: dict[int, int] = {}  # version -> slot that holds it (the two newest)
        self._staging: torch.Tensor | None = None  # NCCL: one bucket on the GPU
        self._delta_of: tuple[int, list[int], list[bytes]] | None = None  # (version, changed, payloads)
        self.last_send: dict[str, float] = {}  # the last send's figures (benchmarks)

    def publish(
        self,
        named_tensors: Iterable[tuple[str, torch.Tensor]],
        version: int,
        dtype: torch.dtype | None = None,
    ) -> WeightManifest:
        slot, manifest = _publish(
            self.slots, named_tensors, version, dtype, Transport.broadcast, self.bucket_bytes
        )
        self._slot_of = {v: s for v, s in self._slot_of.items() if s != slot}
        self._slot_of[version] = slot
        if self.delta:  # what every engine checks a delta against
            from slime.core import delta

            manifest.checksums = delta.checksums(self._bytes(version, manifest), manifest.bucket_bytes)
        return manifest

    def _bytes(self, version: int, manifest: WeightManifest) -> Any:
        """The numpy uint8 view of the slot that holds `version`."""
        slot = self._slot_of.get(version)
        if slot is None:
            raise RuntimeError(
                f"weight version {version} is no longer held (only the two newest are); "
                f"held: {sorted(self._slot_of)}"
            )
        return self.slots.buffers[slot][: layout_bytes(manifest.tensors)].numpy()

    def accept(self, key: str, ranks: int) -> None:
        self.groups.pop(key, None)
        self.groups[key] = _new_group(self.channel, key, 0, ranks + 1)

    def send(
        self, manifest: WeightManifest, keys: Sequence[str], delta_keys: Sequence[str] = ()
    ) -> dict[str, str]:
        """`delta_keys`: the engines among `keys` that serve version `manifest.version - 1` and get
        a delta (with `delta` on and that version still held); the others get the full version."""
        import numpy as np

        missing = [k for k in keys if k not in self.groups]
        if missing:
            raise RuntimeError(f"no weight group for engine(s) {missing}: accept() them first")
        buf = self._bytes(manifest.version, manifest)
        base = manifest.version - 1
        use_delta = [k for k in keys if k in delta_keys] if self.delta and base in self._slot_of else []
        failed: dict[str, str] = {}  # an engine that dies mid-version must not cut the others off
        t0 = time.perf_counter()
        full = [k for k in keys if k not in use_delta]
        if full:
            header = np.array([0, 0, buf.size], dtype=np.int64)
            self._broadcast(full, [header, *_chunks(buf, manifest.bucket_bytes)], failed)
        payload_bytes = 0
        if use_delta:
            if self._delta_of is None or self._delta_of[0] != manifest.version:
                from slime.core import delta

                self._delta_of = (
                    manifest.version,
                    *delta.encode(buf, self._bytes(base, manifest), manifest.bucket_bytes),
                )
            _, changed, payloads = self._delta_of
            payload = np.frombuffer(b"".join(payloads), dtype=np.uint8)
            payload_bytes = payload.size
            table = np.array(
                [x for i, p in zip(changed, payloads, strict=True) for x in (i, len(p))], dtype=np.int64
            )
            header = np.array([1, len(changed), payload.size], dtype=np.int64)
            pieces = [header, *([table] if len(changed) else []), *_chunks(payload, manifest.bucket_bytes)]
            self._broadcast(use_delta, pieces, failed)
        self.last_send = {
            "seconds": time.perf_counter() - t0,
            "full_engines": float(len(full)),
            "delta_engines": float(len(use_delta)),
            "full_bytes": float(buf.size),
            "delta_bytes": float(payload_bytes),
        }
        for k in failed:
            self.groups.pop(k, None)  # a group with a lost peer is unusable
        return failed

    def _broadcast(self, keys: list[str], pieces: list[Any], failed: dict[str, str]) -> None:
        """Broadcast each numpy array of `pieces` in turn to every engine of `keys` that has not
        failed; a lost peer is recorded in `failed`."""
        import torch

        for piece in pieces:
            live = [k for k in keys if k not in failed]
            if not live:
                return
            tensor = torch.from_numpy(piece)
            if self.backend == "nccl":
                tensor = tensor.to("cuda")
            works = []
            for k in live:
                try:
                    works.append((k, self.groups[k].broadcast(tensor, 0, self.timeout)))
                except RuntimeError as e:  # gloo/NCCL report a lost peer as RuntimeError
                    failed[k] = str(e)
            for k, work in works:
                try:
                    work.wait()
                except RuntimeError as e:
                    failed[k] = str(e)

    def close(self) -> None:
        self.groups.clear()
        self.slots.close()


def _chunks(buf: Any, size: int) -> list[Any]:
    """`buf` (a numpy array) in pieces of at most `size` elements (views)."""
    return [buf[s : s + size] for s in range(0, buf.size, size)]


class BroadcastReceiver:
    """Joins this engine's group (group rank `rank`, >= 1) and receives versions into its own buffer
    (the protocol: `BroadcastSender`). A delta is applied to the version held, then every bucket is
    checked against the manifest's checksums; a mismatch raises."""

    def __init__(self, channel: WeightChannel, rank: int) -> None:
        self.channel = channel
        self.timeout = datetime.timedelta(seconds=channel.timeout_s)
        self.group = _new_group(channel, channel.key, rank, channel.world)
        self._buf: torch.Tensor | None = None
        self.version = -1  # the version `_buf` holds
        self.last_receive: dict[str, float] = {}

    def _recv(self, n: int, dtype: Any) -> Any:
        """A numpy array of `n` elements broadcast by rank 0."""
        import numpy as np
        import torch

        out = np.empty(n, dtype=dtype)
        tensor = torch.from_numpy(out)
        if self.channel.backend == "nccl":
            staged = tensor.to("cuda")
            self.group.broadcast(staged, 0, self.timeout).wait()
            tensor.copy_(staged)
        else:
            self.group.broadcast(tensor, 0, self.timeout).wait()
        return out

    def _recv_into(self, buf: Any, chunk: int) -> None:
        for s in range(0, buf.size, chunk):
            piece = self._recv(min(chunk, buf.size - s), buf.dtype)
            buf[s : s + piece.size] = piece

    def receive(self, manifest: WeightManifest) -> list[tuple[str, torch.Tensor]]:
        import numpy as np
        import torch

        from slime.core import delta

        if manifest.transport != Transport.broadcast.value:
            raise ValueError(
                f"the engine's weight channel is broadcast, the manifest is {manifest.transport}"
            )
        t0 = time.perf_counter()
        nbytes = layout_bytes(manifest.tensors)
        mode, changed, payload_bytes = (int(x) for x in self._recv(3, np.int64))
        if mode == 1 and (
            self._buf is None or self._buf.numel() != nbytes or self.version != manifest.version - 1
        ):
            raise RuntimeError(
                f"weight delta for version {manifest.version} needs version {manifest.version - 1}; "
                f"this engine holds {self.version}"
            )
        if self._buf is None or self._buf.numel() != nbytes:
            self._buf = torch.empty(nbytes, dtype=torch.uint8)
        buf = self._buf.numpy()
        if mode == 0:
            self._recv_into(buf, manifest.bucket_bytes)
        else:
            table = (
                self._recv(2 * changed, np.int64).reshape(-1, 2) if changed else np.zeros((0, 2), np.int64)
            )
            payload = np.empty(payload_bytes, dtype=np.uint8)
            self._recv_into(payload, manifest.bucket_bytes)
            offsets = np.concatenate([[0], np.cumsum(table[:, 1])]).astype(np.int64)
            pieces = [payload[offsets[j] : offsets[j + 1]].tobytes() for j in range(len(table))]
            delta.apply(buf, manifest.bucket_bytes, table[:, 0].tolist(), pieces)
        if manifest.checksums:
            bad = delta.verify(buf, manifest.bucket_bytes, manifest.checksums)
            if bad:
                self.version = -1
                raise RuntimeError(
                    f"weight version {manifest.version}: buckets {bad[:8]} fail their checksum"
                )
        self.version = manifest.version
        self.last_receive = {
            "seconds": time.perf_counter() - t0,
            "delta": float(mode),
            "bytes": float(payload_bytes),
        }
        return flat_views(self._buf, manifest.tensors)

    def close(self) -> None:
        self._buf = None


def _outgoing_ip(towards: str | None = None) -> str:
    """This host's address on the interface that reaches `towards`; without `towards`, Ray's node IP
    inside a Ray worker, else the interface of the default route (127.0.0.1 without a network). No
    packet is sent."""
    if towards is None:
        import ray

        if ray.is_initialized():
            return str(ray.util.get_node_ip_address())
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((towards or "10.255.255.255", 1))
            return str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def _new_group(channel: WeightChannel, key: str, rank: int, size: int) -> object:
    """A standalone process group of `size` ranks on the channel's store under `key`. Gloo binds to
    the interface that reaches the trainer (its own address on rank 0), so no hostname lookup can pick
    a loopback address on a cluster."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=channel.timeout_s)
    store = dist.TCPStore(channel.host, channel.port, is_master=False, timeout=timeout)
    prefixed = dist.PrefixStore(f"slime-weights/{key}", store)
    if channel.backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(prefixed, rank, size, options)
    options = dist.ProcessGroupGloo._Options()
    options._timeout = timeout
    iface = channel.host if rank == 0 else _outgoing_ip(channel.host)
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=iface)]
    return dist.ProcessGroupGloo(prefixed, rank, size, options)
