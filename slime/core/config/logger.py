"""The `logger` group (configs/logger/): the metrics sinks."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from slime.core.config.fields import _require_non_negative, _require_positive, opt


class LoggerMode(enum.StrEnum):
    offline = "offline"
    online = "online"
    disabled = "disabled"


@dataclass
class LoggerConfig:
    """Metrics sinks: metrics.jsonl always, wandb and the console as configured."""

    mode: LoggerMode = opt(
        LoggerMode.offline, "wandb: offline (files under the run dir), online, or disabled"
    )
    project: str = opt("slime", "wandb project")
    run_name: str = opt("", "wandb run name (empty: wandb picks one)")
    console: bool = opt(True, "one progress line per step on stderr")
    sample_every: int = opt(10, "log a table of sample trajectories every N steps (0 = never)")
    num_samples: int = opt(4, "rows per sample table")

    def validate(self) -> None:
        _require_non_negative(self, "logger", "sample_every")
        if self.sample_every:
            _require_positive(self, "logger", "num_samples")
