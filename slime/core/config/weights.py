"""The `weights` section (`weights.*` keys; no preset files in configs/): weight pushes to the engines."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from slime.core.config.fields import _require_positive, opt


class Transport(enum.StrEnum):
    auto = "auto"
    shm = "shm"
    broadcast = "broadcast"
    files = "files"


class CommBackend(enum.StrEnum):
    auto = "auto"
    gloo = "gloo"
    nccl = "nccl"


@dataclass
class WeightsConfig:
    """Weight pushes from trainer rank 0 to the engines (slime/weight_push.py, slime/core/transport.py)."""

    transport: Transport = opt(
        Transport.auto,
        "shm: shared-memory slots engines on trainer rank 0's node map; broadcast: torch.distributed "
        "groups, for engines on any node; files: safetensors files in weights.dir, for engines on nodes "
        "that share that filesystem; auto: shm when every engine is on that node, else broadcast",
    )
    backend: CommBackend = opt(
        CommBackend.auto, "broadcast backend; auto: nccl when trainer ranks and engines have GPUs, else gloo"
    )
    dir: str = opt("", "rank 0's weight slots go in DIR/slime-weights-<pid> (empty: /dev/shm, else run_dir)")
    timeout_s: float = opt(600.0, "seconds to set up an engine's broadcast group or to move one version")
    delta: bool = opt(
        False,
        "broadcast: send an engine that serves the previous version only what changed since it (per-bucket "
        "XOR, zstd-compressed, checked by checksum; a full push otherwise)",
    )

    def validate(self) -> None:
        _require_positive(self, "weights", "timeout_s")
