"""The files weight transport: versions as safetensors buckets on disk.

weights.transport=files. `FilesSender.publish` writes each version as safetensors buckets into
`<weights dir>/v<version>/` (`write_weights`, atomically renamed into place; the two newest versions
are kept); the manifest lists their paths and `FilesReceiver` memory-maps them (`read_weights`). For
engines on nodes that share a filesystem with rank 0 (weights.dir on it), and for tools and tests
that hand an engine a version without a trainer: a files manifest names its own files, so any engine
reads one (slime.core.transport `manifest_tensors`).

Contract: `FilesSender` is a `WeightSender` and `FilesReceiver` a `WeightReceiver` (the protocols and
the dispatch that opens them: slime/core/transport.py); `write_weights` and `read_weights` are the two
ends of the on-disk format. Nothing here imports torch at import time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Collection, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from slime.core.checkpoint import MiB, write_buckets
from slime.core.config import Transport
from slime.core.types import WeightChannel, WeightManifest

if TYPE_CHECKING:
    import torch

_VERSION_DIR = re.compile(r"^v(\d+)$")


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
