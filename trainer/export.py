"""Full weights out of a DeepSpeed policy (ZeRO-3 gathered, expert-parallel experts gathered), for
weight pushes and checkpoints.

Every function here is a collective under ZeRO-3 and expert parallelism (`collective=True`): all ranks
call it together (rank 0 writes).
The checkpoint layout and weight names: slime/core/checkpoint.py.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from slime.core import checkpoint as ck
from slime.core.types import WeightManifest

if TYPE_CHECKING:
    from slime.core.transport import WeightSender

_LAYER = re.compile(r"^(.*?\.layers\.\d+)\.")


def full_named_tensors(policy: Any, collective: bool, dtype: torch.dtype) -> Iterator[tuple[str, Tensor]]:
    """Yield (checkpoint name, full CPU tensor in `dtype`) of a DeepSpeed policy, one layer at a time.

    Every rank must exhaust this generator when `collective` (ZeRO-3 or expert parallelism: gathering
    is collective); otherwise each rank reads its local full copies. Parameters are grouped by decoder
    layer, expert-parallel layers are gathered back into transformers' layout
    (`trainer.expert_parallel.to_transformers_layout`), and each group is converted to the checkpoint
    layout (`slime.core.checkpoint.to_checkpoint_format`: tied weights dropped, fused MoE experts split back per
    expert), so peak extra memory is one layer. A LoRA policy's layers are merged first
    (`trainer.lora.merge`: W + scale * B @ A under the transformers names, out of place), so the
    tensors are always the plain model's, never peft's `base_layer`/`lora_A` names.
    """
    import deepspeed

    from trainer.expert_parallel import autoep_layers, to_transformers_layout
    from trainer.lora import adapted_scales, merge, unwrap

    module = policy.module
    ep_layers = autoep_layers(module)
    lora_scales = adapted_scales(module)  # {} without LoRA
    gather_dtype = torch.float32 if lora_scales else dtype  # merged in float32, then cast
    persistent = set()
    for mod_name, mod in module.named_modules():
        for b_name, buf in mod._buffers.items():
            if buf is not None and b_name not in mod._non_persistent_buffers_set:
                persistent.add(f"{mod_name}.{b_name}" if mod_name else b_name)
    entries: list[tuple[str, Tensor]] = list(module.named_parameters())
    entries += [(n, b) for n, b in module.named_buffers() if n in persistent]
    for _, group in layer_groups(entries):
        params = [t for _, t in group if isinstance(t, nn.Parameter) and hasattr(t, "ds_id")]
        ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if params else nullcontext()
        with ctx:
            full = {
                n: t.detach().to(device="cpu", dtype=gather_dtype)
                for n, t in to_transformers_layout(ep_layers, group)
            }
        if lora_scales:
            full = merge(full, lora_scales, dtype)
        yield from ck.to_checkpoint_format(unwrap(module), full).items()


def layer_groups(entries: list[tuple[str, Tensor]]) -> list[tuple[str, list[tuple[str, Tensor]]]]:
    """Group consecutive (name, tensor) entries by decoder layer (`...layers.N.`); other entries
    (embeddings, final norm, head) form a group each."""
    groups: list[tuple[str, list[tuple[str, Tensor]]]] = []
    for name, t in entries:
        match = _LAYER.match(name)
        key = match.group(1) if match else name
        if groups and groups[-1][0] == key:
            groups[-1][1].append((name, t))
        else:
            groups.append((key, [(name, t)]))
    return groups


def _drain(tensors: Iterator[Any]) -> None:
    """Take part in the collective gathers of a generator whose tensors another rank writes."""
    for _ in tensors:
        pass


def publish_weights(
    policy: Any, rank: int, collective: bool, dtype: torch.dtype, version: int, sender: WeightSender | None
) -> WeightManifest | None:
    """Publish the full policy weights (checkpoint names, cast to `dtype` on the way) through rank 0's
    `sender` (slime/core/transport.py). Every rank gathers when `collective`; rank 0 returns the
    manifest, the others None."""
    if rank != 0:
        if collective:
            _drain(full_named_tensors(policy, collective, dtype))
        return None
    if sender is None:
        raise RuntimeError("trainer rank 0 has no weight transport: open_weights() before publish_weights()")
    # Gathered as they are: the copy into the transport casts, one pass instead of a cast copy first.
    return sender.publish(
        full_named_tensors(policy, collective, next(policy.module.parameters()).dtype), version, dtype
    )


def save_checkpoint(
    policy: Any,
    critic: Any,
    *,
    rank: int,
    world_size: int,
    collective: bool,
    dtype: torch.dtype,
    model_dir: str,
    ckpt_dir: str,
    client_state: dict[str, int],
    marker: dict[str, Any],
) -> str:
    """DeepSpeed state (policy, and critic when there is one) on every rank, then on rank 0 a
    transformers export in `<ckpt_dir>/hf` (tokenizer files copied from `model_dir`; a LoRA policy's
    weights merged), a LoRA policy's adapter in peft's format in `<ckpt_dir>/adapter`, and last the
    completion marker `slime_state.json` with `marker` (step, version, ...). Returns ckpt_dir."""
    import torch.distributed as dist

    from trainer import lora

    os.makedirs(ckpt_dir, exist_ok=True)
    save_rng_state(ckpt_dir, rank)
    policy.save_checkpoint(ckpt_dir, tag=ck.DS_TAG, client_state=client_state, save_latest=False)
    if critic is not None:
        critic.save_checkpoint(
            os.path.join(ckpt_dir, ck.CRITIC_DIR), tag=ck.DS_TAG, client_state=client_state, save_latest=False
        )
    tensors = full_named_tensors(policy, collective, dtype)
    if rank == 0:
        hf_dir = os.path.join(ckpt_dir, ck.HF_DIR)
        ck.write_hf_checkpoint(tensors, lora.unwrap(policy.module).config, model_dir, hf_dir, dtype=dtype)
    elif collective:
        _drain(tensors)
    if lora.is_lora(policy.module):
        adapter = lora.adapter_tensors(policy.module)  # gathers under ZeRO-3: every rank calls it
        if rank == 0:
            lora.save_adapter(policy.module, adapter, os.path.join(ckpt_dir, ck.ADAPTER_DIR))
    if world_size > 1:
        dist.barrier()  # every rank's DeepSpeed files are on disk before the marker says complete
    if rank == 0:
        ck.write_state(ckpt_dir, **marker)
    return ckpt_dir


def save_rng_state(ckpt_dir: str, rank: int) -> None:
    """This rank's random states, so a resumed run draws what the uninterrupted one would have."""
    import random

    import numpy as np

    os.makedirs(os.path.join(ckpt_dir, ck.RNG_DIR), exist_ok=True)
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save(state, os.path.join(ckpt_dir, ck.RNG_DIR, f"rank{rank}.pt"))


def load_rng_state(ckpt_dir: str, rank: int) -> bool:
    """Restore what `save_rng_state` wrote; False for checkpoints written without it (or with fewer ranks)."""
    import random

    import numpy as np

    path = os.path.join(ckpt_dir, ck.RNG_DIR, f"rank{rank}.pt")
    if not os.path.exists(path):
        return False
    state = torch.load(path, weights_only=False)  # our own file: Python and NumPy states are tuples
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    return True


def load_checkpoint(policy: Any, critic: Any, ckpt_dir: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """Restore weights and optimizer state of the policy (and critic) from a checkpoint written by
    `save_checkpoint`, or from the latest complete one under a directory of checkpoints.
    Returns (the checkpoint's path, its marker, the client state saved with the policy)."""

    path = ck.resolve_checkpoint(ckpt_dir)
    marker = ck.read_state(path)
    loaded, client = policy.load_checkpoint(path, tag=ck.DS_TAG)
    if loaded is None:
        raise FileNotFoundError(f"{path}: DeepSpeed could not load tag {ck.DS_TAG!r}")
    if critic is not None:
        critic.load_checkpoint(os.path.join(path, ck.CRITIC_DIR), tag=ck.DS_TAG)
    return path, marker, dict(client or {})
