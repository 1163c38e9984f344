"""Placement (slime/placement.py): requests fitted onto the cluster before any actor starts, cores
shared on a small local machine, a request that cannot fit refused with what it asks and what there
is, and an actor Ray cannot place named within seconds; several rollout workers through the real
loop on the suite's 2-CPU cluster."""

from __future__ import annotations

import asyncio
import logging

import pytest

from slime import api
from slime.core.config import RayConfig, RolloutConfig, SlimeConfig, TrainerConfig
from slime.placement import Request, fit, plan, watch


def _cfg(workers: int = 1, ranks: int = 1, address: str = "", **rollout) -> SlimeConfig:
    cfg = SlimeConfig.__new__(SlimeConfig)  # the sections placement reads
    from slime.core.config import BufferConfig

    cfg.rollout = RolloutConfig(num_workers=workers, **rollout)
    cfg.trainer = TrainerConfig(num_ranks=ranks)
    cfg.buffer = BufferConfig()
    cfg.ray = RayConfig(address=address)
    return cfg


def test_requests_fit_largest_first_onto_nodes():
    reqs = [Request("a", 1.0, 0.0), Request("b", 2.0, 0.0), Request("c", 1.0, 0.0)]
    assert fit(reqs, [{"CPU": 2.0}, {"CPU": 2.0}]) is None  # b on node 0, a and c on node 1
    message = fit(reqs, [{"CPU": 3.0}, {"CPU": 0.5}])
    assert message.startswith("Ray cannot place c (CPU 1, GPU 0): the actors ask for CPU 4 and GPU 0 in all")


def test_a_small_local_machine_shares_its_cores():
    # One rank and two workers at 1 CPU each on 2 cores: each gets 2/3 of a core instead of waiting.
    shared = plan(_cfg(workers=2), [{"CPU": 2.0}])
    assert shared.rollout.num_cpus_per_worker == pytest.approx(2 / 3)
    assert shared.trainer.num_cpus_per_rank == pytest.approx(2 / 3)
    assert plan(_cfg(workers=1), [{"CPU": 2.0}]).rollout.num_cpus_per_worker == 1.0  # fits as asked


def test_a_joined_cluster_keeps_the_requests_and_refuses_what_cannot_fit():
    with pytest.raises(ValueError, match="Ray cannot place .* cluster has CPU 2 and GPU 0 on 1 node"):
        plan(_cfg(workers=2, address="auto"), [{"CPU": 2.0}])


def test_gpus_are_never_shared():
    cfg = _cfg(workers=1)
    cfg.trainer = TrainerConfig(gpus_per_rank=1.0)
    with pytest.raises(ValueError, match="TrainerRank 0 .*GPU 1"):
        plan(cfg, [{"CPU": 16.0}])


def test_an_actor_ray_cannot_place_is_named_within_seconds(ray_cluster, caplog):
    import ray

    @ray.remote(num_cpus=64)
    class Huge:
        def ready(self) -> bool:
            return True

    actor = Huge.remote()
    try:
        with caplog.at_level(logging.WARNING, logger="slime"), pytest.raises(RuntimeError, match="Huge"):
            asyncio.run(watch(actor.ready.remote(), [Request("Huge 0", 64.0, 0.0)], 0.5, 2.0))
        assert "Ray has not started Huge (CPU 64, GPU 0) after 1.5s" in caplog.text  # a warning by then
    finally:
        ray.kill(actor)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [2, 4])
def test_several_rollout_workers_train_through_the_real_loop(tmp_path, ray_cluster, workers):
    """On the suite's 2-CPU cluster (one rank and `workers` engines share the cores): every worker
    generates, each reports its load and tokens/s, and the steps train."""
    rows = api.run(
        [
            "+experiment=tiny",
            f"rollout.num_workers={workers}",
            "rollout.max_concurrent_groups=2",
            "trainer.steps=3",
            "rollout.kv_cache_gib=0.25",
        ],
        run_dir=str(tmp_path),
    )
    assert [r["step"] for r in rows] == [0, 1, 2]
    for i in range(workers):
        assert any(r[f"rollout/worker{i}/tokens_per_s"] > 0 for r in rows), i
        assert all(
            f"rollout/worker{i}/groups_in_flight" in r and r[f"rollout/worker{i}/restarts"] == 0 for r in rows
        )
