"""The shm weight transport: engines on trainer rank 0's node map its slot files.

weights.transport=shm. `ShmSender.publish` copies each version into the next of two flat buffers in
files under the weights dir (/dev/shm by default; `WeightSlots`, slime/core/flat_buffer.py) and
returns a manifest naming the slot file; `send` has nothing to do. `ShmReceiver` maps the same file
(the same path on the same node) and hands out views of the mapping: no copy before the engine's own
load (rollout/engines/cpu_alias.py can even serve the weights from the slot itself).

`_publish` (write one version into the next slot, describe it as a manifest) is shared with the
broadcast transport (slime/core/transport_broadcast.py), which keeps its slots for re-sends.

Contract: `ShmSender` is a `WeightSender` and `ShmReceiver` a `WeightReceiver` (the protocols and
the dispatch that opens them: slime/core/transport.py). Nothing here imports torch at import time.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from slime.core.config import Transport
from slime.core.flat_buffer import WeightSlots, _map_file, _nbytes, flat_views, layout_bytes
from slime.core.types import WeightChannel, WeightManifest

if TYPE_CHECKING:
    import torch


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
