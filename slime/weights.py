"""Weight transport from the trainer to the inference engines: versioned buckets of safetensors files.

The trainer gathers full parameters, `write_weights` writes them as a few safetensors files ("buckets")
into `<out_dir>/v<version>/` and returns a `WeightManifest`; engines (`rollout/`) read the files with
`read_weights` (memory-mapped, so on /dev/shm a reload costs one copy into the engine's tensors).

Contracts:
- Names are the checkpoint names transformers' `save_pretrained` would write, which is what vLLM's
  `load_weights` expects. For most models these equal `model.state_dict()` names; `checkpoint_tensors`
  (from a model) and `to_checkpoint_format` (from gathered tensors) apply the two differences:
  tied weights (`lm_head.weight` when `tie_word_embeddings`) are left out, because checkpoints leave
  them out and vLLM ties them itself; and transformers v5 layouts that differ from the checkpoint
  (fused MoE experts `mlp.experts.gate_up_proj`) are converted back to per-expert tensors.
- A version directory appears atomically (written under a temporary name, then renamed), so a reader
  never sees half a version. After a write, only the newest `keep` version directories remain: an
  engine must load a manifest before the trainer publishes `keep` newer versions.
- `write_weights` never keeps two names for one storage: a tensor that shares memory with one already
  written (a tied weight passed as a state_dict) is skipped, as save_pretrained does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from slime.types import WeightManifest

if TYPE_CHECKING:
    import torch

MiB = 1 << 20
_VERSION_DIR = re.compile(r"^v(\d+)$")


def default_weights_dir(name: str = "default") -> str:
    """Where weight buckets go by default: /dev/shm (RAM, no disk I/O) when it exists, else the temp dir.

    `name` separates runs that share a machine (e.g. the run's name or id).
    """
    root = (
        "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    )
    return os.path.join(root, "slime-weights", name)


def version_dir(out_dir: str, version: int) -> str:
    """The directory holding one version's buckets."""
    return os.path.join(out_dir, f"v{version:08d}")


def _tied_targets(model) -> set[str]:
    """Names of parameters that are tied to another one (the target side of the tie), e.g. lm_head.weight."""
    tied = getattr(model, "all_tied_weights_keys", None)
    if tied is None:  # transformers < 5
        tied = {}
        if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
            tied = {"lm_head.weight": "model.embed_tokens.weight"}
    return set(tied)


def to_checkpoint_format(model, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert full tensors under `model.state_dict()` names into the names and layout of a checkpoint.

    `model` only provides its class and config (it may be a ZeRO-3 partitioned model whose parameters are
    empty); `tensors` holds the gathered full values. Tied targets are dropped and transformers' weight
    conversions (e.g. fused MoE experts) are reverted, exactly as `save_pretrained` does.
    """
    skip = _tied_targets(model)
    state = {k: v for k, v in tensors.items() if k not in skip}
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers < 5 has no conversions
        return state
    return revert_weight_conversion(model, state)


def checkpoint_tensors(model) -> dict[str, torch.Tensor]:
    """The tensors `save_pretrained(model)` would write, under their checkpoint names (no copies where
    no conversion is needed)."""
    return to_checkpoint_format(model, model.state_dict())


def _prune(out_dir: Path, keep: int) -> None:
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


@dataclass
class Bucket:
    """One safetensors file written by `write_buckets`: its file name, tensor names and bytes."""

    file: str
    names: list[str]
    num_bytes: int


def write_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    directory: Path,
    bucket_bytes: int,
    file_name: Callable[[int], str],
    *,
    dtype: torch.dtype | None = None,
    skip: Collection[str] = (),
    metadata: dict[str, str] | None = None,
) -> list[Bucket]:
    """Write `named_tensors` into `directory` as safetensors files of about `bucket_bytes` each.

    The one bucketed writer behind the weight transport (`write_weights`) and the transformers export
    (`slime.checkpoint.write_hf_checkpoint`). Tensors are consumed one at a time (a gathering generator
    keeps memory to one bucket), moved to CPU, cast to `dtype` when floating-point (None keeps them),
    and made contiguous; views are cloned so no two saved tensors alias. A tensor larger than a bucket
    gets a bucket of its own. Names in `skip` are left out, and so is a tensor that shares storage,
    offset, shape and dtype with one already written (a tied weight passed under a second name), as
    save_pretrained does. `file_name(i)` names the i-th file. Returns the buckets in write order.
    """
    from safetensors.torch import save_file

    # storage key -> weak reference to the tensor that claimed it. Weak, so a generator's freed tensors
    # are not kept alive; checked for liveness, so a reused address is not mistaken for a tie.
    seen_storage: dict[tuple[int, int, tuple[int, ...], torch.dtype], weakref.ref] = {}
    buckets: list[Bucket] = []
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        if pending:
            name = file_name(len(buckets))
            save_file(pending, str(directory / name), metadata=metadata)
            buckets.append(Bucket(file=name, names=list(pending), num_bytes=pending_bytes))
        pending, pending_bytes = {}, 0

    for name, tensor in named_tensors:
        if name in skip:
            continue
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.to("cpu")
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel():
            owner = seen_storage.get(key)
            if owner is not None and owner() is not None:
                continue
            seen_storage[key] = weakref.ref(tensor)
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        # save_file needs contiguous, non-shared tensors; clone views so buckets never alias.
        t = t.contiguous()
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        nbytes = t.numel() * t.element_size()
        if pending and pending_bytes + nbytes > bucket_bytes:
            flush()
        pending[name] = t
        pending_bytes += nbytes
    flush()
    return buckets


def write_weights(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    version: int,
    out_dir: str | None = None,
    bucket_mb: int = 512,
    *,
    dtype: torch.dtype | None = None,
    skip: Collection[str] = (),
    keep: int = 2,
) -> WeightManifest:
    """Write `named_tensors` as safetensors buckets of about `bucket_mb` MiB into `<out_dir>/v<version>/`.

    - out_dir: default `default_weights_dir()` (under /dev/shm when it exists).
    - dtype: cast floating-point tensors (e.g. torch.bfloat16 halves the bytes); None keeps them as given.
    - skip: names to leave out (e.g. tied weights a caller's gathered dict still holds).
    - keep: how many newest version directories to keep after writing (>= 1).
    Bucketing, casting and tie detection as in `write_buckets`.
    Rewriting an existing version replaces it. Returns the manifest (absolute file paths, in load order).
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    if bucket_mb <= 0:
        raise ValueError(f"bucket_mb must be > 0, got {bucket_mb}")
    root = Path(out_dir or default_weights_dir())
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
    _prune(root, keep)
    return WeightManifest(
        version=version,
        files=[str(final / f) for f in files],
        num_bytes=total_bytes,
        num_tensors=len(names),
    )


def read_weights(manifest: WeightManifest) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from the manifest's files, file by file in order.

    Tensors are memory-mapped from the files (read-only views: copy them into place, don't modify
    them); they stay valid after the files are deleted, as the mapping keeps the pages alive.
    """
    from safetensors import safe_open

    for path in manifest.files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, f.get_tensor(name)
