"""Flat buffers: one version of the weights as one contiguous byte array.

Every tensor of a version (checkpoint names and layout, slime/core/checkpoint.py) sits at a fixed,
64-byte aligned offset, listed as (name, dtype, shape, offset) entries; the q/k/v and gate/up weights of
one module lie back to back, as an engine fuses them (`plan_layout`), so an engine can use them in
place (rollout/engines/cpu_alias.py). The layout is planned on the first version and kept: every later
version is copied into memory that is already allocated and touched, with no serialisation (one copy
per tensor, plus a cast where the export dtype differs).

`WeightSlots` holds two such buffers in files (trainer rank 0, /dev/shm by default) and writes versions
into them alternately; the shm and broadcast transports (slime/core/transport_shm.py,
slime/core/transport_broadcast.py) send from them.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ALIGN = 64  # byte alignment of every tensor in a flat buffer (a cache line; enough for any dtype)
MiB = 1 << 20

# (name, dtype name, shape, byte offset): one tensor of a flat buffer. Lists, not tuples, after a
# trip through msgpack or JSON; both are accepted.
TensorEntry = tuple[str, str, Sequence[int], int]


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
    (rollout/engines/cpu_alias.py)."""
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
