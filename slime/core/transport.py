"""Weight transports: how one version of the policy's weights gets from trainer rank 0 into an engine.

These are the strategies of the weight push (slime/weight_push.py owns the push end to end: it
chooses one, opens both ends, publishes each version and delivers it). Each has a trainer end
(`WeightSender`, hosted by trainer rank 0, written to by trainer/export.py) and an engine end
(`WeightReceiver`, in the process that loads the weights: vLLM's worker through
rollout/engines/vllm_ext.py, or the transformers engine in-process), opened once from the
`WeightChannel` the sender returns. Names are checkpoint names (slime/core/checkpoint.py).

- `shm`: `ShmSender.publish` copies the version into the next of two flat buffers in files under the
  weights dir (/dev/shm by default; slime/core/flat_buffer.py); engines on the same node map the same
  file (`ShmReceiver`: views of the mapping, no copy before the engine's own load). `send` has
  nothing to do.
- `broadcast`: `BroadcastSender.publish` writes the slot the same way (kept there for re-sends to
  restarted engines); `send` broadcasts its bytes in chunks of `trainer.weight_bucket_mb` over one
  torch.distributed group per engine: trainer rank 0 (group rank 0) and the engine's workers (ranks
  1.., one per tensor-parallel worker), gloo on CPU, NCCL on GPUs, set up on a TCPStore that rank 0
  hosts. A group per engine, so an engine that restarts joins a group of its own and is sent the last
  version alone; gloo's broadcast sends from the root to every peer anyway. `BroadcastReceiver` joins
  its group and receives into a flat buffer of its own (allocated once and reused). Nothing but bytes
  and the layout cross: no file path.
- `files`: `FilesSender.publish` writes the version as safetensors buckets into
  `<weights dir>/v<version>/` (`write_weights`, atomically renamed into place; the two newest versions
  are kept); the manifest lists their paths and `FilesReceiver` memory-maps them (`read_weights`). For
  engines on nodes that share a filesystem with rank 0 (weights.dir on it), and for tools and tests
  that hand an engine a version without a trainer.

The two newest versions stay loadable in every transport: pushes are serialised and the push's
remembered manifest (what it loads into a restarted engine) is replaced before the trainer publishes
the next version, so a slot is never written while an engine reads it.

`choose_transport` makes weights.transport=auto's choice from Ray node ids.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from slime.core.checkpoint import MiB, write_buckets
from slime.core.config import CommBackend, Transport
from slime.core.flat_buffer import WeightSlots, _map_file, _nbytes, flat_views, layout_bytes
from slime.core.types import WeightChannel, WeightManifest

if TYPE_CHECKING:
    import torch

_VERSION_DIR = re.compile(r"^v(\d+)$")


def choose_transport(setting: str, trainer_node: str | None, engine_nodes: Sequence[str | None]) -> Transport:
    """weights.transport resolved: `auto` is shm when every engine runs on trainer rank 0's Ray node
    (a node id that is None, outside Ray, counts as this node), else broadcast; shm and broadcast are
    kept, and so is files. Raises ValueError for shm with an engine on another node (it would find no
    slot file)."""
    kind = Transport(setting)
    off_node = [i for i, node in enumerate(engine_nodes) if node != trainer_node]
    if kind is Transport.auto:
        return Transport.broadcast if off_node else Transport.shm
    if kind is Transport.shm and off_node:
        raise ValueError(
            f"weights.transport=shm: rollout workers {off_node} run on another node than trainer rank 0 "
            "and cannot map its /dev/shm; set weights.transport=broadcast (or auto)"
        )
    return kind


def choose_backend(setting: str, trainer_gpus: float, engine_gpus: float) -> str:
    """weights.backend resolved: `auto` is nccl when trainer ranks and engines both have GPUs, else gloo."""
    if CommBackend(setting) is CommBackend.auto:
        return CommBackend.nccl.value if trainer_gpus > 0 and engine_gpus > 0 else CommBackend.gloo.value
    return CommBackend(setting).value


# ------------------------------------------------------------------------------------ trainer end
class WeightSender(Protocol):
    """Trainer rank 0's end of a transport."""

    channel: WeightChannel  # what engines need to open their end (per-engine `key` left empty)

    def publish(
        self,
        named_tensors: Iterable[tuple[str, torch.Tensor]],
        version: int,
        dtype: torch.dtype | None = None,
    ) -> WeightManifest:
        """Write one version (checkpoint names, in a fixed order; floating-point tensors cast to
        `dtype` when given) where the transport sends it from."""
        ...

    def accept(self, key: str, ranks: int) -> None:
        """Set up the link to one engine (`ranks` workers) that opens `channel` with this `key`;
        blocks until it has joined."""
        ...

    def send(
        self, manifest: WeightManifest, keys: Sequence[str], delta_keys: Sequence[str] = ()
    ) -> dict[str, str]:
        """Deliver a published version to the engines `keys` while they receive it (`delta_keys`:
        those that hold the previous version, for transports that send deltas). Returns the engines
        it could not reach, key -> error (their links are dropped: a restarted engine is accepted
        again under a new key); the others get the whole version regardless."""
        ...

    def close(self) -> None: ...


class ShmSender:
    """weights.transport=shm: engines on this node map the slots themselves."""

    def __init__(self, weights_dir: str, timeout_s: float) -> None:
        self.slots = WeightSlots(weights_dir)
        self.channel = WeightChannel(
            transport=Transport.shm.value, weights_dir=weights_dir, timeout_s=timeout_s
        )

    def publish(
        self,
        named_tensors: Iterable[tuple[str, torch.Tensor]],
        version: int,
        dtype: torch.dtype | None = None,
    ) -> WeightManifest:
        return _publish(self.slots, named_tensors, version, dtype, Transport.shm)[1]

    def accept(self, key: str, ranks: int) -> None:
        """Nothing to set up: the engine maps the slot files when it loads a version."""

    def send(
        self, manifest: WeightManifest, keys: Sequence[str], delta_keys: Sequence[str] = ()
    ) -> dict[str, str]:
        """Nothing to send: the slot the manifest names is already written."""
        return {}

    def close(self) -> None:
        self.slots.close()


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


class FilesSender:
    """weights.transport=files: versions as safetensors buckets under the weights dir."""

    def __init__(self, weights_dir: str, bucket_mb: int, timeout_s: float) -> None:
        self.weights_dir = weights_dir
        self.bucket_mb = bucket_mb
        self.channel = WeightChannel(
            transport=Transport.files.value, weights_dir=weights_dir, timeout_s=timeout_s
        )

    def publish(
        self,
        named_tensors: Iterable[tuple[str, torch.Tensor]],
        version: int,
        dtype: torch.dtype | None = None,
    ) -> WeightManifest:
        return write_weights(named_tensors, version, self.weights_dir, self.bucket_mb, dtype=dtype)

    def accept(self, key: str, ranks: int) -> None:
        """Nothing to set up: the manifest names the files."""

    def send(
        self, manifest: WeightManifest, keys: Sequence[str], delta_keys: Sequence[str] = ()
    ) -> dict[str, str]:
        """Nothing to send: the files are written."""
        return {}

    def close(self) -> None:
        """The files stay for engines still reading them (the weight push removes its weights dir)."""


def open_sender(
    transport: str, weights_dir: str, bucket_mb: int, backend: str, timeout_s: float, delta: bool = False
) -> WeightSender:
    """Trainer rank 0's end of `transport` (resolve auto with `choose_transport` first); `delta`:
    broadcast deltas to engines that hold the previous version (weights.delta)."""
    kind = Transport(transport)
    if kind is Transport.shm:
        return ShmSender(weights_dir, timeout_s)
    if kind is Transport.broadcast:
        return BroadcastSender(weights_dir, bucket_mb, backend, timeout_s, delta=delta)
    if kind is Transport.files:
        return FilesSender(weights_dir, bucket_mb, timeout_s)
    raise ValueError(f"open_sender needs shm, broadcast or files, got {transport!r} (resolve auto first)")


def _publish(
    slots: WeightSlots,
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    version: int,
    dtype: torch.dtype | None,
    kind: Transport,
    bucket_bytes: int = 0,
) -> tuple[int, WeightManifest]:
    """Both senders' `publish`: write one version into the next of `slots`; returns the slot index
    and the version's manifest. An shm manifest names the slot file (engines map it); a broadcast
    one carries `bucket_bytes` instead (the slot stays with the sender)."""
    slot, entries = slots.write(named_tensors, dtype)
    manifest = WeightManifest(
        version=version,
        transport=kind.value,
        num_bytes=sum(_nbytes(d, s) for _, d, s, _ in entries),
        num_tensors=len(entries),
        slot=slots.names[slot] if kind is Transport.shm else "",
        tensors=entries,
        bucket_bytes=bucket_bytes,
    )
    return slot, manifest


# ------------------------------------------------------------------------------------ engine end
class WeightReceiver(Protocol):
    """An engine's end of a transport, in the process that loads the weights."""

    def receive(self, manifest: WeightManifest) -> list[tuple[str, torch.Tensor]]:
        """The version's tensors (checkpoint names), valid until the next `receive`."""
        ...

    def close(self) -> None: ...


class ShmReceiver:
    """Maps the trainer's slot files from `weights_dir` (the same path on the same node)."""

    def __init__(self, weights_dir: str) -> None:
        self.weights_dir = weights_dir
        self._maps: dict[str, torch.Tensor] = {}

    def receive(self, manifest: WeightManifest) -> list[tuple[str, torch.Tensor]]:
        if manifest.transport != Transport.shm.value:
            raise ValueError(f"the engine's weight channel is shm, the manifest is {manifest.transport}")
        path = os.path.join(self.weights_dir, os.path.basename(manifest.slot))
        nbytes = layout_bytes(manifest.tensors)
        buf = self._maps.get(path)
        if buf is None or buf.numel() < nbytes:
            if not os.path.exists(path):
                raise FileNotFoundError(
                    f"{path}: weights.transport=shm needs the engine on trainer rank 0's node, reading "
                    "the trainer's weights dir; set weights.transport=broadcast for engines elsewhere"
                )
            # Slots come in pairs of one sender; a new sender's files replace the old mappings.
            token = os.path.basename(path).rsplit("-", 1)[0]
            self._maps = {p: m for p, m in self._maps.items() if os.path.basename(p).startswith(token)}
            buf = self._maps[path] = _map_file(path, nbytes, create=False)
        return flat_views(buf, manifest.tensors)

    def close(self) -> None:
        self._maps.clear()


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


def open_receiver(channel: WeightChannel, worker_rank: int = 0) -> WeightReceiver:
    """An engine worker's end of `channel`; `worker_rank` is the worker's tensor-parallel rank. For
    broadcast this blocks until trainer rank 0 accepts the channel's key."""
    if channel.transport == Transport.shm.value:
        return ShmReceiver(channel.weights_dir)
    if channel.transport == Transport.broadcast.value:
        return BroadcastReceiver(channel, 1 + worker_rank)
    if channel.transport == Transport.files.value:
        return FilesReceiver()
    raise ValueError(f"unknown weight channel transport {channel.transport!r}")


def manifest_tensors(
    manifest: WeightManifest, receiver: WeightReceiver | None
) -> Iterable[tuple[str, torch.Tensor]]:
    """The (name, tensor) pairs of a manifest at the engine's end: through the engine's receiver
    (which must match the manifest). A files manifest names its own files, so any engine reads one,
    opened or not."""
    if manifest.transport == Transport.files.value:
        return read_weights(manifest)
    if receiver is None:
        raise RuntimeError(
            f"a {manifest.transport} weight manifest needs the engine's weight channel (open_weights first)"
        )
    return receiver.receive(manifest)


class FilesReceiver:
    """Reads a files manifest's safetensors files (memory-mapped)."""

    def receive(self, manifest: WeightManifest) -> list[tuple[str, torch.Tensor]]:
        return list(read_weights(manifest))

    def close(self) -> None:
        """Nothing held: the mappings live as long as the tensors."""


# ------------------------------------------------------------------------------------ files on disk
def version_dir(out_dir: str, version: int) -> str:
    """The directory holding one version's buckets."""
    return os.path.join(out_dir, f"v{version:08d}")


def _prune_versions(out_dir: Path, keep: int) -> None:
    versions = []
    for entry in out_dir.iterdir():
        m = _VERSION_DIR.match(entry.name)
        if m and entry.is_dir():
            versions.append((int(m.group(1)), entry))
        elif (
            entry.name.startswith(".tmp-v") and entry.is_dir() and time.time() - entry.stat().st_mtime > 3600
        ):
            shutil.rmtree(entry, ignore_errors=True)  # left by a writer that died; an hour is plenty
    versions.sort()
    for _, path in versions[: max(0, len(versions) - keep)]:
        shutil.rmtree(path, ignore_errors=True)


def write_weights(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    version: int,
    out_dir: str,
    bucket_mb: int = 512,
    *,
    dtype: torch.dtype | None = None,
    skip: Collection[str] = (),
    keep: int = 2,
) -> WeightManifest:
    """Write `named_tensors` as safetensors buckets of about `bucket_mb` MiB into `<out_dir>/v<version>/`
    (the files transport); returns its manifest (absolute file paths, in load order).

    - dtype: cast floating-point tensors (e.g. torch.bfloat16 halves the bytes); None keeps them as given.
    - skip: names to leave out (e.g. tied weights a caller's gathered dict still holds).
    - keep: how many newest version directories to keep after writing (>= 1): an engine must load a
      manifest before `keep` newer versions are written.
    A version directory appears atomically (written under a temporary name, then renamed), so a reader
    never sees half a version; rewriting an existing version replaces it. Bucketing, casting and tie
    detection (a tensor sharing storage with one already written is skipped, as save_pretrained does)
    as in `slime.core.checkpoint.write_buckets`.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    if bucket_mb <= 0:
        raise ValueError(f"bucket_mb must be > 0, got {bucket_mb}")
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = Path(version_dir(str(root), version))
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-v{version:08d}-", dir=root))
    try:
        buckets = write_buckets(
            named_tensors,
            tmp,
            bucket_mb * MiB,
            lambda i: f"bucket-{i:05d}.safetensors",
            dtype=dtype,
            skip=skip,
            metadata={"format": "pt", "slime_version": str(version)},
        )
        names = [n for b in buckets for n in b.names]
        total_bytes = sum(b.num_bytes for b in buckets)
        files = [b.file for b in buckets]
        (tmp / "manifest.json").write_text(
            json.dumps({"version": version, "files": files, "num_bytes": total_bytes, "names": names})
        )
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune_versions(root, keep)
    return WeightManifest(
        version=version,
        transport=Transport.files.value,
        num_bytes=total_bytes,
        num_tensors=len(names),
        files=[str(final / f) for f in files],
    )


def read_weights(manifest: WeightManifest) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from a files manifest, file by file in order.

    Tensors are memory-mapped from the files (read-only views: copy them into place, don't modify
    them); they stay valid after the files are deleted, as the mapping keeps the pages alive.
    """
    from safetensors import safe_open

    for path in manifest.files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, f.get_tensor(name)


def for_engine(channel: WeightChannel, key: str, ranks: int) -> WeightChannel:
    """`channel` as one engine opens it: its own group `key`, with `ranks` workers."""
    return replace(channel, key=key, world=ranks + 1)


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
