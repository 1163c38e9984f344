"""Checkpoints: layout, the transformers export, and finding a checkpoint to resume from.

One checkpoint is one directory (the controller uses `<run_dir>/checkpoints/step_NNNNNN`):

    <ckpt>/ds/...                 DeepSpeed engine state of the policy (weights, optimizer, per rank)
    <ckpt>/critic/ds/...          the critic's DeepSpeed state (PPO only)
    <ckpt>/hf/                    a transformers checkpoint: config.json, *.safetensors, tokenizer
                                  files, generation_config.json; loadable by transformers and vLLM
    <ckpt>/slime_state.json       {"step", "version", ...}; written last, so its presence means the
                                  checkpoint is complete

The trainer (trainer/worker.py) writes the DeepSpeed part on every rank and the rest on rank 0.
Nothing here imports torch at module import time.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

STATE_FILE = "slime_state.json"
HF_DIR = "hf"
DS_TAG = "ds"
CRITIC_DIR = "critic"
MiB = 1 << 20

# Files of a model directory that are weights or the model config; everything else in it (tokenizer
# files, chat template, generation config) is copied into the export unchanged.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
_NOT_COPIED = {
    "config.json",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
    ".slime-complete",
}


def write_state(ckpt_dir: str, step: int, version: int, **extra: Any) -> str:
    """Write the completion marker `<ckpt_dir>/slime_state.json` atomically; returns its path."""
    path = Path(ckpt_dir) / STATE_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"step": int(step), "version": int(version), **extra}, indent=1) + "\n")
    tmp.replace(path)
    return str(path)


def read_state(ckpt_dir: str) -> dict[str, Any]:
    """The marker of a complete checkpoint. Raises FileNotFoundError if the checkpoint is incomplete."""
    path = Path(ckpt_dir) / STATE_FILE
    if not path.exists():
        raise FileNotFoundError(f"{ckpt_dir} is not a complete slime checkpoint (no {STATE_FILE})")
    return json.loads(path.read_text())


def is_complete(ckpt_dir: str) -> bool:
    return (Path(ckpt_dir) / STATE_FILE).exists()


def latest_checkpoint(root: str) -> str | None:
    """The complete checkpoint under `root` with the highest step (None when there is none)."""
    base = Path(root)
    if not base.is_dir():
        return None
    best: tuple[int, str] | None = None
    for entry in base.iterdir():
        if entry.is_dir() and is_complete(str(entry)):
            step = int(read_state(str(entry))["step"])
            if best is None or step > best[0]:
                best = (step, str(entry))
    return best[1] if best else None


def resolve_checkpoint(path: str) -> str:
    """Accept either one checkpoint directory or a directory of checkpoints (take the latest).

    Raises FileNotFoundError naming the path when neither holds a complete checkpoint.
    """
    path = os.path.expanduser(path)
    if is_complete(path):
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(
            f"resume={path!r}: no complete checkpoint there (a checkpoint dir holds {STATE_FILE})"
        )
    return latest


def copy_tokenizer_files(src_dir: str, dst_dir: str) -> list[str]:
    """Copy the non-weight, non-config files of a model dir (tokenizer, chat template, generation
    config) into `dst_dir`; returns the copied file names."""
    copied = []
    for entry in sorted(Path(src_dir).iterdir()):
        if not entry.is_file() or entry.name in _NOT_COPIED or entry.name.endswith(_WEIGHT_SUFFIXES):
            continue
        shutil.copy2(entry, Path(dst_dir) / entry.name)
        copied.append(entry.name)
    return copied


def write_hf_checkpoint(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    config: Any,
    src_dir: str,
    out_dir: str,
    dtype: torch.dtype | None = None,
    shard_mb: int = 4096,
) -> str:
    """Write a transformers checkpoint that `AutoModelForCausalLM.from_pretrained` and vLLM load.

    - named_tensors: full tensors under checkpoint names (tied weights already left out, MoE experts
      in the checkpoint layout), consumed once, one at a time, so a gathering generator keeps memory
      to one shard.
    - config: the model's `PretrainedConfig`; written with `dtype` as its dtype.
    - src_dir: the model directory the run started from; its tokenizer files are copied.
    - dtype: cast floating-point tensors (None keeps them).
    - shard_mb: shard size; one `model.safetensors` when everything fits, else
      `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`, as save_pretrained does.

    Written into a temporary sibling and renamed, so `out_dir` never holds half a checkpoint.
    Returns out_dir.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    limit = shard_mb * MiB
    shards: list[dict[str, torch.Tensor]] = []
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = 0
    total = 0
    shard_files: list[str] = []

    def flush() -> None:
        nonlocal shard, shard_bytes
        if shard:
            name = f"shard-{len(shard_files):05d}.tmp"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            shard_files.append(name)
            shards.append({k: None for k in shard})  # names only, to build the index
        shard, shard_bytes = {}, 0

    try:
        for name, tensor in named_tensors:
            t = tensor.detach().to("cpu")
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            t = (
                t.contiguous().clone()
                if t.untyped_storage().nbytes() != t.numel() * t.element_size()
                else t.contiguous()
            )
            nbytes = t.numel() * t.element_size()
            if shard and shard_bytes + nbytes > limit:
                flush()
            shard[name] = t
            shard_bytes += nbytes
            total += nbytes
        flush()
        # Final names: a single file is model.safetensors; several follow save_pretrained's pattern.
        if len(shard_files) == 1:
            (tmp / shard_files[0]).rename(tmp / "model.safetensors")
        else:
            n = len(shard_files)
            weight_map = {}
            for i, (fname, names) in enumerate(zip(shard_files, shards, strict=True)):
                final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                (tmp / fname).rename(tmp / final)
                weight_map.update({k: final for k in names})
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        config = copy.deepcopy(config)  # never mutate the live model's config
        if dtype is not None:
            config.dtype = dtype  # transformers 5 reads `dtype` from config.json
        config.save_pretrained(str(tmp))
        copy_tokenizer_files(src_dir, str(tmp))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(out)
