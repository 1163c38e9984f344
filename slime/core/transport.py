"""Weight transports: how one version of the policy's weights gets from trainer rank 0 into an engine.

These are the strategies of the weight push (slime/weight_push.py owns the push end to end: it
chooses one, opens both ends, publishes each version and delivers it). Each has a trainer end
(`WeightSender`, hosted by trainer rank 0, written to by trainer/export.py) and an engine end
(`WeightReceiver`, in the process that loads the weights: vLLM's worker through
rollout/engines/vllm_ext.py, or the transformers engine in-process), opened once from the
`WeightChannel` the sender returns. Names are checkpoint names (slime/core/checkpoint.py).

This module is the contract and the dispatch: the two protocols, `open_sender` / `open_receiver`
(the one place that maps a transport to its two ends), `manifest_tensors` (what an engine loads from
a manifest) and `for_engine`. Each transport lives in a module of its own:

- `shm` (slime/core/transport_shm.py): `ShmSender.publish` copies the version into the next of two
  flat buffers in files under the weights dir (/dev/shm by default; slime/core/flat_buffer.py);
  engines on the same node map the same file (`ShmReceiver`: views of the mapping, no copy before the
  engine's own load). `send` has nothing to do.
- `broadcast` (slime/core/transport_broadcast.py): `BroadcastSender.publish` writes the slot the same
  way (kept there for re-sends to restarted engines); `send` broadcasts its bytes in chunks of
  `trainer.weight_bucket_mb` over one torch.distributed group per engine: trainer rank 0 (group rank
  0) and the engine's workers (ranks 1.., one per tensor-parallel worker), gloo on CPU, NCCL on GPUs,
  set up on a TCPStore that rank 0 hosts. A group per engine, so an engine that restarts joins a group
  of its own and is sent the last version alone; gloo's broadcast sends from the root to every peer
  anyway. `BroadcastReceiver` joins its group and receives into a flat buffer of its own (allocated
  once and reused). Nothing but bytes and the layout cross: no file path.
- `files` (slime/core/transport_files.py): `FilesSender.publish` writes the version as safetensors
  buckets into `<weights dir>/v<version>/` (`write_weights`, atomically renamed into place; the two
  newest versions are kept); the manifest lists their paths and `FilesReceiver` memory-maps them
  (`read_weights`). For engines on nodes that share a filesystem with rank 0 (weights.dir on it), and
  for tools and tests that hand an engine a version without a trainer.

The two newest versions stay loadable in every transport: pushes are serialised and the push's
remembered manifest (what it loads into a restarted engine) is replaced before the trainer publishes
the next version, so a slot is never written while an engine reads it.

`choose_transport` makes weights.transport=auto's choice from Ray node ids.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Protocol

from slime.core.config import CommBackend, Transport
from slime.core.transport_broadcast import BroadcastReceiver, BroadcastSender
from slime.core.transport_files import FilesReceiver, FilesSender, read_weights
from slime.core.transport_shm import ShmReceiver, ShmSender
from slime.core.types import WeightChannel, WeightManifest

if TYPE_CHECKING:
    import torch


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


# ------------------------------------------------------------------------------------ engine end
class WeightReceiver(Protocol):
    """An engine's end of a transport, in the process that loads the weights."""

    def receive(self, manifest: WeightManifest) -> list[tuple[str, torch.Tensor]]:
        """The version's tensors (checkpoint names), valid until the next `receive`."""
        ...

    def close(self) -> None: ...


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


def for_engine(channel: WeightChannel, key: str, ranks: int) -> WeightChannel:
    """`channel` as one engine opens it: its own group `key`, with `ranks` workers."""
    return replace(channel, key=key, world=ranks + 1)
