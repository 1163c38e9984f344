"""Checkpoints: layout, the transformers export, and finding a checkpoint to resume from.

One checkpoint is one directory (the controller uses `<run_dir>/checkpoints/step_NNNNNN`):

    <ckpt>/ds/...                 DeepSpeed state of the policy (weights, optimizer, per rank)
    <ckpt>/critic/ds/...          the critic's DeepSpeed state (PPO only)
    <ckpt>/hf/                    a transformers checkpoint: config.json, *.safetensors, tokenizer
                                  files, generation_config.json; loadable by transformers and vLLM
                                  (with LoRA: the merged weights)
    <ckpt>/adapter/               with LoRA (model.lora.r > 0): the adapter in peft's format,
                                  adapter_config.json + adapter_model.safetensors
    <ckpt>/slime_state.json       {"step", "version", ...}; written last, so its presence means the
                                  checkpoint is complete

The trainer (trainer/export.py) writes the DeepSpeed part on every rank and the rest on rank 0.
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
ADAPTER_DIR = "adapter"

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
        # `<name>.partial` is a checkpoint still being written (or torn by a kill): never resume from it.
        if entry.is_dir() and not entry.name.endswith(".partial") and is_complete(str(entry)):
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
      to one shard (`slime.weights.write_buckets` writes them).
    - config: the model's `PretrainedConfig`; written with `dtype` as its dtype.
    - src_dir: the model directory the run started from; its tokenizer files are copied.
    - dtype: cast floating-point tensors (None keeps them).
    - shard_mb: shard size; one `model.safetensors` when everything fits, else
      `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`, as save_pretrained does.

    Written into a temporary sibling and renamed, so `out_dir` never holds half a checkpoint.
    Returns out_dir.
    """
    from slime.weights import MiB, write_buckets

    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        buckets = write_buckets(
            named_tensors,
            tmp,
            shard_mb * MiB,
            lambda i: f"shard-{i:05d}.tmp",
            dtype=dtype,
            metadata={"format": "pt"},
        )
        # Final names: a single file is model.safetensors; several follow save_pretrained's pattern.
        if len(buckets) == 1:
            (tmp / buckets[0].file).rename(tmp / "model.safetensors")
        else:
            n = len(buckets)
            weight_map = {}
            for i, bucket in enumerate(buckets):
                final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                (tmp / bucket.file).rename(tmp / final)
                weight_map.update({k: final for k in bucket.names})
            total = sum(b.num_bytes for b in buckets)
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
