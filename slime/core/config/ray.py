"""The `ray` section (`ray.*` keys; no preset files in configs/): where Ray runs."""

from __future__ import annotations

from dataclasses import dataclass

from slime.core.config.fields import _require, _require_non_negative, _require_positive, opt


@dataclass
class RayConfig:
    """Where Ray runs."""

    address: str = opt(
        "",
        '"" starts a private local cluster (RAY_ADDRESS is ignored); "auto" joins the running one; or HOST:PORT',
    )
    num_cpus: int = opt(0, "CPUs for a local cluster (0 = all)")
    worker_niceness: int = opt(
        0, "nice (0-19) of a local cluster's engines and trainer ranks (Ray's default: 15)"
    )
    placement_timeout_s: float = opt(
        300.0, "seconds an actor may wait for Ray to start it before the run stops (named every 10 s)"
    )

    def validate(self) -> None:
        _require_non_negative(self, "ray", "num_cpus")
        _require_positive(self, "ray", "placement_timeout_s")
        # Raising priority (a negative nice) needs privileges a user rarely has: Ray would fail later.
        _require(
            0 <= self.worker_niceness <= 19,
            f"ray.worker_niceness must be in 0..19, got {self.worker_niceness}",
        )
