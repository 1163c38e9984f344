"""How a run starts Ray (slime/controller.py `ray_init_options`): a local cluster whose worker
processes (the engines and trainer ranks) run at `ray.worker_niceness`, 0 by default, instead of
Ray's 15; a cluster joined by address keeps its own settings. The suite's shared cluster is started
the same way, so the real-Ray test below sees what a run's actors see."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from slime.controller import ray_init_options
from slime.core.config import RayConfig


def test_a_local_cluster_runs_its_workers_at_the_configured_niceness() -> None:
    options = ray_init_options(RayConfig(num_cpus=2, worker_niceness=5))
    assert options["address"] == "local"  # a private cluster, whatever RAY_ADDRESS says
    assert options["num_cpus"] == 2
    assert options["_system_config"] == {"worker_niceness": 5}
    assert ray_init_options(RayConfig())["_system_config"] == {"worker_niceness": 0}
    assert "num_cpus" not in ray_init_options(RayConfig())  # 0 = every core


def test_a_joined_cluster_keeps_its_own_settings() -> None:
    options = ray_init_options(RayConfig(address="auto", num_cpus=2, worker_niceness=5))
    assert options["address"] == "auto"
    assert "_system_config" not in options and "num_cpus" not in options


@pytest.mark.parametrize("nice", [-1, 20])
def test_niceness_out_of_range_is_rejected(nice: int) -> None:
    with pytest.raises(ValueError, match="ray.worker_niceness"):
        RayConfig(worker_niceness=nice).validate()


def test_actors_run_at_niceness_zero(ray_cluster) -> None:
    import ray

    @ray.remote(num_cpus=0)
    def niceness() -> int:
        return os.nice(0)

    assert ray.get(niceness.remote()) == 0  # Ray alone would give 15


def test_without_an_address_a_run_starts_its_own_cluster_whatever_ray_address_names(tmp_path) -> None:
    """A RAY_ADDRESS left in the environment (another job's cluster, or a dead one) is not joined:
    Ray alone would try it and fail ("_system_config must not be provided" with a live one)."""
    code = (
        "import ray; from slime.controller import ray_init_options; from slime.core.config import RayConfig; "
        "ray.init(**ray_init_options(RayConfig(num_cpus=1), log_to_driver=False)); "
        "print('started', ray.cluster_resources()['CPU']); ray.shutdown()"
    )
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:9"}  # nothing listens there
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "started 1.0" in out.stdout
