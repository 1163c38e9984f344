"""Weight transports: how one version of the policy's weights gets from trainer rank 0 into the engines.

Both transports carry a *flat buffer*: every tensor of a version (checkpoint names and layout, see
`slime.weights`) at a fixed, 64-byte aligned offset of one contiguous byte array, listed in the
manifest's `tensors` as (name, dtype, shape, offset); the q/k/v and gate/up weights of one module lie
back to back, as an engine fuses them (`plan_layout`). The layout is planned on the first publish and
kept: every later version is copied into memory that is already allocated and touched, with no
serialisation (one copy per tensor, plus a cast where the export dtype differs).

Trainer rank 0 (`WeightSender`, driven by trainer/export.py and trainer/worker.py):
- `WeightSlots` holds two flat buffers, files `slot-<token>-<i>.bin` in the weights dir (/dev/shm by
  default), and writes versions into them alternately. The fleet's remembered manifest (what it loads
  into a restarted engine) is always one of the two newest versions: pushes are serialised and a push
  replaces it before the next publish, so a slot is never written while an engine reads it.
- `ShmSender` (weights.transport=shm): `publish` writes the slot; engines on the same node map the
  same file. `send` has nothing to do.
- `BroadcastSender` (weights.transport=broadcast): `publish` writes the slot (kept there for re-sends
  to restarted engines); `send` broadcasts the slot's bytes in chunks of `trainer.weight_bucket_mb`
  over one torch.distributed group per engine: trainer rank 0 (group rank 0) and the engine's workers
  (ranks 1.., one per tensor-parallel worker), gloo on CPU, NCCL on GPUs, set up on a TCPStore that
  rank 0 hosts. A group per engine, so an engine that restarts joins a group of its own and is sent
  the last version alone; gloo's broadcast sends from the root to every peer anyway. The groups are
  standalone process groups beside DeepSpeed's default one.

Engine end (`WeightReceiver`, in the process that loads the weights: vLLM's worker through
rollout/vllm_ext.py, or the transformers engine in-process), opened once from a `WeightChannel`:
- `ShmReceiver` maps the slot file named in the manifest, looked up in its own weights dir, once per
  file, and returns views of it: no copy before the engine's own load.
- `BroadcastReceiver` joins its group and receives into a flat buffer of its own (allocated once and
  reused), then returns views of it. Nothing but bytes and the layout cross: no file path.

`choose_transport` makes weights.transport=auto's choice from Ray node ids.
"""

from __future__ import annotations

import datetime
import os
import secrets
import socket
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Protocol

from slime.config import CommBackend, Transport
from slime.types import WeightChannel, WeightManifest

if TYPE_CHECKING:
    import torch

ALIGN = 64  # byte alignment of every tensor in a flat buffer (a cache line; enough for any dtype)
MiB = 1 << 20

# (name, dtype name, shape, byte offset): one tensor of a flat buffer. Lists, not tuples, after a
# trip through msgpack or JSON; both are accepted.
TensorEntry = tuple[str, str, Sequence[int], int]


def choose_transport(setting: str, trainer_node: str | None, engine_nodes: Sequence[str | None]) -> Transport:
    """weights.transport resolved: `auto` is shm when every engine runs on trainer rank 0's Ray node
    (a node id that is None, outside Ray, counts as this node), else broadcast; shm and broadcast are
    kept. Raises ValueError for shm with an engine on another node (it would find no slot file)."""
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


# ------------------------------------------------------------------------------------ flat buffers
def _dtype(name: str) -> torch.dtype:
    import torch

    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown tensor dtype {name!r} in a weight manifest")
    return dtype


def _nbytes(dtype: str, shape: Sequence[int]) -> int:
    n = _dtype(dtype).itemsize
    for d in shape:
        n *= int(d)
    return n


# Sibling modules whose weights an inference engine fuses into one parameter (vLLM's qkv_proj and
# gate_up_proj of Llama-family models), in the fused order: laid out back to back.
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _fusion_key(name: str) -> tuple[str, int, str] | None:
    """(parent module, fusion group, attribute) of a fused-group member's tensor name, else None."""
    parts = name.split(".")
    if len(parts) < 2:
        return None
    for i, group in enumerate(FUSED):
        if parts[-2] in group:
            return (".".join(parts[:-2]), i, parts[-1])
    return None


def plan_layout(
    tensors: Sequence[tuple[str, torch.Tensor]], dtype: torch.dtype | None = None
) -> list[TensorEntry]:
    """The flat-buffer layout of `tensors`: entries in their order (the order versions arrive in),
    floating-point tensors stored as `dtype` when given. Each tensor starts at an ALIGN-byte aligned
    offset, except that the members of a `FUSED` group of one module (same dtype) follow each other
    in the group's order with no gap, so an engine can use them as its fused parameter in place
    (rollout/cpu_alias.py)."""
    stored: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, t in tensors:
        if name in stored:
            raise ValueError(f"weight {name!r} appears twice in one version")
        kind = str(dtype if dtype is not None and t.is_floating_point() else t.dtype).removeprefix("torch.")
        stored[name] = (kind, tuple(int(d) for d in t.shape))
    groups: dict[tuple[str, int, str], list[str]] = {}
    for name in stored:
        key = _fusion_key(name)
        if key is not None:
            groups.setdefault(key, []).append(name)
    offsets: dict[str, int] = {}
    offset = 0
    for name in stored:  # units (a tensor, or a whole fused group) in order of first appearance
        if name in offsets:
            continue
        key = _fusion_key(name)
        unit = [name]
        if key is not None and len({stored[m][0] for m in groups[key]}) == 1:
            order = FUSED[key[1]]
            unit = sorted(groups[key], key=lambda m: order.index(m.split(".")[-2]))
        for member in unit:
            offsets[member] = offset
            offset += _nbytes(*stored[member])
        offset = -(-offset // ALIGN) * ALIGN
    return [(name, kind, shape, offsets[name]) for name, (kind, shape) in stored.items()]


def layout_bytes(entries: Sequence[TensorEntry]) -> int:
    """The size of the flat buffer a layout needs (the end of its furthest tensor)."""
    return max((int(offset) + _nbytes(dtype, shape) for _, dtype, shape, offset in entries), default=0)


def flat_views(buf: torch.Tensor, entries: Sequence[TensorEntry]) -> list[tuple[str, torch.Tensor]]:
    """(name, view) of every tensor of a flat buffer: `buf` is uint8 [>= layout_bytes(entries)]; the
    views share its memory (copy them into place; the next version overwrites them)."""
    out = []
    for name, dtype, shape, offset in entries:
        start = int(offset)
        out.append((name, buf[start : start + _nbytes(dtype, shape)].view(_dtype(dtype)).view(tuple(shape))))
    return out


def _map_file(path: str, nbytes: int, create: bool) -> torch.Tensor:
    """uint8 [nbytes] tensor over a shared mapping of `path` (created, or grown, when `create`)."""
    import torch

    if create:
        # Reserve the pages now: a write into a mapping of a full tmpfs kills the process (SIGBUS).
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(fd, 0, max(nbytes, 1))
        except OSError as e:
            raise OSError(
                e.errno,
                f"{path}: cannot reserve {nbytes / MiB:.0f} MiB for a weight slot ({e.strerror}); "
                "point weights.dir at a filesystem with room for two copies of the weights",
            ) from e
        finally:
            os.close(fd)
    return torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)


class WeightSlots:
    """Two flat buffers in files under `root`, written alternately (trainer rank 0).

    `write` takes the tensors of one version in a fixed order (names, dtypes and shapes must be the
    same in every version; the first call plans the layout and creates the files). Tensors are copied
    one at a time as a generator yields them, so a gathering generator keeps its memory to one layer.
    """

    def __init__(self, root: str) -> None:
        self.root = root
        self.entries: list[TensorEntry] | None = None
        self.nbytes = 0
        self.buffers: list[torch.Tensor] = []
        self.names: list[str] = []
        self._token = secrets.token_hex(4)  # a new sender never reuses an old sender's mapped files
        self._next = 0

    def write(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype | None = None
    ) -> tuple[int, list[TensorEntry]]:
        """Copy one version into the next slot, casting floating-point tensors to `dtype` on the way
        (one pass: no cast copy beforehand); returns (slot index, layout)."""
        import torch

        slot = self._next
        with torch.no_grad():
            if self.entries is None:
                tensors = [(n, t.detach()) for n, t in named_tensors]
                self._create(plan_layout(tensors, dtype))
                for (_, view), (_, t) in zip(
                    flat_views(self.buffers[slot], self.entries), tensors, strict=True
                ):
                    view.copy_(t)
            else:
                self._write_streaming(named_tensors, slot)
        self._next = 1 - slot
        return slot, list(self.entries)

    def _write_streaming(self, named_tensors: Iterable[tuple[str, torch.Tensor]], slot: int) -> None:
        assert self.entries is not None
        views = flat_views(self.buffers[slot], self.entries)
        count = 0
        for name, t in named_tensors:
            if count >= len(views) or views[count][0] != name:
                expected = views[count][0] if count < len(views) else "nothing more"
                raise ValueError(f"weights changed between versions: got {name!r}, expected {expected!r}")
            view = views[count][1]
            if view.shape != t.shape:
                raise ValueError(f"weight {name!r} changed shape: {tuple(t.shape)} != {tuple(view.shape)}")
            view.copy_(t.detach())
            count += 1
        if count != len(views):
            raise ValueError(f"weights changed between versions: {len(views) - count} tensors missing")

    def _create(self, entries: list[TensorEntry]) -> None:
        os.makedirs(self.root, exist_ok=True)
        self.entries = entries
        self.nbytes = layout_bytes(entries)
        self.names = [f"slot-{self._token}-{i}.bin" for i in range(2)]
        self.buffers = [_map_file(os.path.join(self.root, n), self.nbytes, create=True) for n in self.names]

    def close(self) -> None:
        """Unmap the buffers and remove the files."""
        self.buffers = []
        for name in self.names:
            try:
                os.remove(os.path.join(self.root, name))
            except FileNotFoundError:
                pass


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

    def send(self, manifest: WeightManifest, keys: Sequence[str]) -> dict[str, str]:
        """Deliver a published version to the engines `keys` while they receive it. Returns the
        engines it could not reach, key -> error (their links are dropped: a restarted engine is
        accepted again under a new key); the others get the whole version regardless."""
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

    def send(self, manifest: WeightManifest, keys: Sequence[str]) -> dict[str, str]:
        """Nothing to send: the slot the manifest names is already written."""
        return {}

    def close(self) -> None:
        self.slots.close()


class BroadcastSender:
    """weights.transport=broadcast: one process group per engine on a TCPStore hosted here."""

    def __init__(
        self, weights_dir: str, bucket_mb: int, backend: str, timeout_s: float, host: str | None = None
    ) -> None:
        import torch.distributed as dist

        self.slots = WeightSlots(weights_dir)
        self.bucket_bytes = max(1, bucket_mb) * MiB
        self.backend = backend
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
        return manifest

    def accept(self, key: str, ranks: int) -> None:
        self.groups.pop(key, None)
        self.groups[key] = _new_group(self.channel, key, 0, ranks + 1)

    def send(self, manifest: WeightManifest, keys: Sequence[str]) -> dict[str, str]:
        import torch

        slot = self._slot_of.get(manifest.version)
        if slot is None:
            raise RuntimeError(
                f"weight version {manifest.version} is no longer held (only the two newest are); "
                f"held: {sorted(self._slot_of)}"
            )
        missing = [k for k in keys if k not in self.groups]
        if missing:
            raise RuntimeError(f"no weight group for engine(s) {missing}: accept() them first")
        failed: dict[str, str] = {}  # an engine that dies mid-version must not cut the others off
        buf = self.slots.buffers[slot][: layout_bytes(manifest.tensors)]
        for start in range(0, buf.numel(), manifest.bucket_bytes):
            live = [k for k in keys if k not in failed]
            if not live:
                break
            chunk = buf[start : start + manifest.bucket_bytes]
            if self.backend == "nccl":
                if self._staging is None or self._staging.numel() < chunk.numel():
                    self._staging = torch.empty(manifest.bucket_bytes, dtype=torch.uint8, device="cuda")
                staged = self._staging[: chunk.numel()]
                staged.copy_(chunk)
                chunk = staged
            works = []
            for k in live:
                try:
                    works.append((k, self.groups[k].broadcast(chunk, 0, self.timeout)))
                except RuntimeError as e:  # gloo/NCCL report a lost peer as RuntimeError
                    failed[k] = str(e)
            for k, work in works:
                try:
                    work.wait()
                except RuntimeError as e:
                    failed[k] = str(e)
        for k in failed:
            self.groups.pop(k, None)  # a group with a lost peer is unusable
        return failed

    def close(self) -> None:
        self.groups.clear()
        self.slots.close()


def open_sender(
    transport: str, weights_dir: str, bucket_mb: int, backend: str, timeout_s: float
) -> WeightSender:
    """Trainer rank 0's end of `transport` (shm or broadcast; resolve auto with `choose_transport`)."""
    kind = Transport(transport)
    if kind is Transport.shm:
        return ShmSender(weights_dir, timeout_s)
    if kind is Transport.broadcast:
        return BroadcastSender(weights_dir, bucket_mb, backend, timeout_s)
    raise ValueError(f"open_sender needs shm or broadcast, got {transport!r} (resolve auto first)")


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
        files=[],
        num_bytes=sum(_nbytes(d, s) for _, d, s, _ in entries),
        num_tensors=len(entries),
        transport=kind.value,
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
    """Joins this engine's group (group rank `rank`, >= 1) and receives versions into its own buffer."""

    def __init__(self, channel: WeightChannel, rank: int) -> None:
        self.channel = channel
        self.timeout = datetime.timedelta(seconds=channel.timeout_s)
        self.group = _new_group(channel, channel.key, rank, channel.world)
        self._buf: torch.Tensor | None = None
        self._staging: torch.Tensor | None = None

    def receive(self, manifest: WeightManifest) -> list[tuple[str, torch.Tensor]]:
        import torch

        if manifest.transport != Transport.broadcast.value:
            raise ValueError(
                f"the engine's weight channel is broadcast, the manifest is {manifest.transport}"
            )
        nbytes = layout_bytes(manifest.tensors)
        if self._buf is None or self._buf.numel() != nbytes:
            self._buf = torch.empty(nbytes, dtype=torch.uint8)
        for start in range(0, nbytes, manifest.bucket_bytes):
            chunk = self._buf[start : start + manifest.bucket_bytes]
            if self.channel.backend == "nccl":
                if self._staging is None or self._staging.numel() < chunk.numel():
                    self._staging = torch.empty(manifest.bucket_bytes, dtype=torch.uint8, device="cuda")
                staged = self._staging[: chunk.numel()]
                self.group.broadcast(staged, 0, self.timeout).wait()
                chunk.copy_(staged)
            else:
                self.group.broadcast(chunk, 0, self.timeout).wait()
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
    raise ValueError(f"unknown weight channel transport {channel.transport!r}")


def manifest_tensors(
    manifest: WeightManifest, receiver: WeightReceiver | None
) -> Iterable[tuple[str, torch.Tensor]]:
    """The (name, tensor) pairs of a manifest at the engine's end: read from its safetensors files
    (transport "files"), or through the engine's receiver (which must match the manifest)."""
    if manifest.transport == "files":
        from slime.weights import read_weights

        return read_weights(manifest)
    if receiver is None:
        raise RuntimeError(
            f"a {manifest.transport} weight manifest needs the engine's weight channel (open_weights first)"
        )
    return receiver.receive(manifest)


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
