"""The checkpoint format: layout and names, publishing and pruning, the transformers export, and
finding a checkpoint to resume from. The one place that knows how a checkpoint looks on disk: the
controller publishes and prunes them, trainer ranks write their parts, `slime.train` finds one.

A run's checkpoints live under `<run_dir>/checkpoints/`, one directory each, `step_NNNNNN` (the
optimizer steps done). A checkpoint is written as `step_NNNNNN.partial` and renamed into place when
complete (`publish`), so a kill at any moment leaves the previous one the latest loadable.

    <ckpt>/ds/...                 DeepSpeed state of the policy (weights, optimizer, per rank)
    <ckpt>/critic/ds/...          the critic's DeepSpeed state (PPO only)
    <ckpt>/hf/                    a transformers checkpoint: config.json, *.safetensors, tokenizer
                                  files, generation_config.json; loadable by transformers and vLLM
                                  (with LoRA: the merged weights)
    <ckpt>/adapter/               with LoRA (model.lora.r > 0): the adapter in peft's format,
                                  adapter_config.json + adapter_model.safetensors
    <ckpt>/rng/rank<r>.pt         each trainer rank's Python, NumPy and torch random states
    <ckpt>/controller_state.json  the controller's part: the buffer's tickets and untrained groups,
                                  the wandb run id
    <ckpt>/slime_state.json       {"step", "version", ...}; written last, so its presence means the
                                  checkpoint is complete

Weight names. Every weight slime writes (pushes to engines, `hf/`) carries the names transformers'
`save_pretrained` writes, which is what vLLM's `load_weights` expects. For most models these equal
`model.state_dict()` names; `checkpoint_tensors` (from a model) and `to_checkpoint_format` (from
gathered tensors) apply the two differences: tied weights (`lm_head.weight` when
`tie_word_embeddings`) are left out, because checkpoints leave them out and vLLM ties them itself;
and transformers v5 layouts that differ from the checkpoint (fused MoE experts
`mlp.experts.gate_up_proj`) are converted back to per-expert tensors.

The trainer (trainer/export.py) writes the DeepSpeed part on every rank and the rest on rank 0.
Nothing here imports torch at module import time.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import weakref
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

MiB = 1 << 20

CHECKPOINTS_DIR = "checkpoints"  # under the run dir
STEP_PREFIX = "step_"  # step_NNNNNN: the optimizer steps done when it was written
PARTIAL_SUFFIX = ".partial"  # a checkpoint being written (or torn by a kill); never resumed from
STATE_FILE = "slime_state.json"
CONTROLLER_STATE = "controller_state.json"
HF_DIR = "hf"
DS_TAG = "ds"
CRITIC_DIR = "critic"
ADAPTER_DIR = "adapter"
RNG_DIR = "rng"

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
        if entry.is_dir() and not entry.name.endswith(PARTIAL_SUFFIX) and is_complete(str(entry)):
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


def checkpoint_dir(run_dir: str, steps_done: int) -> str:
    """Where the checkpoint written after `steps_done` optimizer steps is published."""
    return os.path.join(run_dir, CHECKPOINTS_DIR, f"{STEP_PREFIX}{steps_done:06d}")


def partial_dir(final: str) -> str:
    """The temporary name a checkpoint is written under; an old leftover of that name is removed."""
    partial = final + PARTIAL_SUFFIX
    shutil.rmtree(partial, ignore_errors=True)
    return partial


def publish(partial: str, final: str, keep: int) -> str:
    """Rename a complete checkpoint into place (one atomic rename), then keep only the newest `keep`
    complete checkpoints beside it (0 keeps all). Returns `final`."""
    shutil.rmtree(final, ignore_errors=True)  # an incomplete leftover of the same name
    os.rename(partial, final)
    prune(os.path.dirname(final), keep)
    return final


def prune(root: str, keep: int) -> None:
    """Delete all but the newest `keep` complete `step_N` checkpoints under `root` (0 keeps all)."""
    if keep <= 0:
        return
    done = sorted(d for d in os.listdir(root) if d.startswith(STEP_PREFIX) and not d.endswith(PARTIAL_SUFFIX))
    for name in done[:-keep]:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def write_controller_state(ckpt_dir: str, state: dict[str, Any]) -> None:
    """The controller's part of a checkpoint (buffer tickets and groups, wandb run id)."""
    with open(os.path.join(ckpt_dir, CONTROLLER_STATE), "w", encoding="utf-8") as f:
        json.dump(state, f)


def read_controller_state(ckpt_dir: str) -> dict[str, Any]:
    """The controller's part of a checkpoint ({} for checkpoints written before it existed)."""
    path = os.path.join(ckpt_dir, CONTROLLER_STATE)
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


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
      to one shard (`write_buckets` writes them).
    - config: the model's `PretrainedConfig`; written with `dtype` as its dtype.
    - src_dir: the model directory the run started from; its tokenizer files are copied.
    - dtype: cast floating-point tensors (None keeps them).
    - shard_mb: shard size; one `model.safetensors` when everything fits, else
      `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`, as save_pretrained does.

    Written into a temporary sibling and renamed, so `out_dir` never holds half a checkpoint.
    Returns out_dir.
    """
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


# --------------------------------------------------------------------- weight names and files
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

    The one bucketed writer behind the transformers export (`write_hf_checkpoint`) and the files
    weight transport (`slime.core.transport_files.write_weights`). Tensors are consumed one at a time (a gathering generator
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
