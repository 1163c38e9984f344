"""Overlap of generation and training: `perf/overlap_efficiency` (slime/metrics.py), the rollout
worker's generation clock and core claims (rollout/worker.py), and the automatic thread budgets
(slime/core/config/, slime/core/cores.py). No engine, trainer or Ray: the parts alone."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import make_group, make_trajectory

import rollout.worker as rollout_worker
from rollout.worker import GenerationClock
from slime.core.config import RolloutConfig
from slime.core.cores import (
    CoreClaim,
    CoreShare,
    available_cores,
    engine_threads,
    set_thread_budget,
    trainer_threads,
)
from slime.metrics import StepTimes, batch_metrics, overlap_efficiency, step_row


# ------------------------------------------------------------------------------------ the metric
def test_perfect_overlap_scores_one() -> None:
    # Training-bound: generation (6 s) hides behind training (10 s); a step is training plus the push.
    assert overlap_efficiency(StepTimes(step_s=12.0, train_s=10.0, sync_s=2.0, wait_s=0.0, gen_s=6.0)) == 1.0
    # Generation-bound: the engines pause only for their weight load (0.5 s of the 2 s push).
    times = StepTimes(step_s=20.5, train_s=10.0, sync_s=2.0, wait_s=8.5, gen_s=20.0, load_s=0.5)
    assert overlap_efficiency(times) == 1.0


def test_synchronous_step_scores_the_bound_over_the_sum() -> None:
    # G + T + P per batch: the bound max(G + L, T + P) = 12 over 18.
    times = StepTimes(step_s=18.0, train_s=10.0, sync_s=2.0, wait_s=6.0, gen_s=6.0, load_s=1.0)
    assert overlap_efficiency(times) == pytest.approx(12.0 / 18.0)


def test_waiting_on_the_buffer_lowers_it() -> None:
    # The trainer waited 5 s for a batch that took the engine only 6 s to generate: time lost somewhere.
    times = StepTimes(step_s=17.0, train_s=10.0, sync_s=2.0, wait_s=5.0, gen_s=6.0)
    assert overlap_efficiency(times) == pytest.approx(12.0 / 17.0)
    assert overlap_efficiency(StepTimes(step_s=0.0, train_s=0.0, sync_s=0.0, wait_s=0.0)) == 0.0


def test_step_row_reports_it() -> None:
    times = StepTimes(step_s=12.0, train_s=10.0, sync_s=2.0, wait_s=0.0, gen_s=6.0)
    group = make_group(
        [make_trajectory([1, 2], [3, 4], reward=1.0), make_trajectory([1, 2], [5], reward=0.0)]
    )
    row = step_row(0, 1, batch_metrics([group], 0), {}, {}, {}, times, rollout_tokens=10)
    assert row["perf/overlap_efficiency"] == 1.0
    assert row["time/gen_s"] == 6.0


# ------------------------------------------------------------------------------- generation clock
class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0

    def perf_counter(self) -> float:
        return self.now


@pytest.fixture
def fake_time(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    fake = FakeTime()
    monkeypatch.setattr(rollout_worker.time, "perf_counter", fake.perf_counter)
    return fake


def test_clock_counts_concurrent_episodes_once_and_skips_weight_loads(fake_time: FakeTime, tmp_path) -> None:
    claim = tmp_path / "claims" / "worker0"
    clock = GenerationClock(CoreClaim(str(claim), threads=3))
    fake_time.now += 5  # idle: not counted
    clock.enter()
    assert claim.read_text() == "3"  # claimed while anything is in flight
    fake_time.now += 2
    clock.enter()  # a second group beside the first
    fake_time.now += 1
    clock.pause()  # a weight load
    fake_time.now += 4
    clock.resume()
    fake_time.now += 1
    clock.exit()
    assert claim.exists()
    fake_time.now += 2
    clock.exit()
    assert not claim.exists()  # released once nothing is in flight
    fake_time.now += 7
    assert clock.take() == 6.0  # 2 + 1 + 1 + 2
    assert clock.take() == 0.0


def test_closing_a_claim_withdraws_it_and_the_empty_folder(tmp_path) -> None:
    folder = tmp_path / "claims"
    first = GenerationClock(CoreClaim(str(folder / "worker0"), 1))
    second = GenerationClock(CoreClaim(str(folder / "worker1"), 1))
    first.enter()
    second.enter()
    first.claim.close()  # stopped with an episode in flight: the claim goes, the folder stays for worker1
    assert sorted(p.name for p in folder.iterdir()) == ["worker1"]
    second.claim.close()
    assert not folder.exists()  # no leftovers in /dev/shm on any node


def test_clock_without_a_claims_folder_only_counts(fake_time: FakeTime) -> None:
    clock = GenerationClock(CoreClaim(None, threads=1))
    clock.enter()
    fake_time.now += 3
    assert clock.take() == 3.0  # so far, while still in flight
    fake_time.now += 1
    clock.exit()
    clock.claim.close()
    assert clock.take() == 1.0


# ---------------------------------------------------------------------------------- thread budgets
def test_engine_threads_follow_the_mode() -> None:
    auto = RolloutConfig(threads_per_worker=0)
    assert engine_threads(auto, max_staleness=0, cores=2) == 2  # synchronous: the whole machine
    assert engine_threads(auto, max_staleness=1, cores=2) == 1  # asynchronous: half of it
    assert engine_threads(RolloutConfig(threads_per_worker=0, num_workers=2), 0, 16) == 8
    assert engine_threads(RolloutConfig(threads_per_worker=0, num_workers=4), 1, 2) == 1  # at least one
    assert engine_threads(RolloutConfig(threads_per_worker=3), 0, 16) == 3  # explicit wins


def test_trainer_threads_take_what_engines_do_not_claim() -> None:
    assert trainer_threads(0, num_ranks=1, cores=2, claimed=0) == 2
    assert trainer_threads(0, num_ranks=1, cores=2, claimed=1) == 1
    assert trainer_threads(0, num_ranks=1, cores=2, claimed=2) == 1  # at least one
    assert trainer_threads(0, num_ranks=2, cores=16, claimed=8) == 4
    assert trainer_threads(5, num_ranks=1, cores=2, claimed=2) == 5  # explicit wins
    assert 1 <= available_cores() <= (os.cpu_count() or 1)
    assert available_cores(ray_num_cpus=1) == 1


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_core_share_follows_the_claims(tmp_path, restore_threads) -> None:
    claims = tmp_path / "claims"
    share = CoreShare(cores=4, num_ranks=1, claims_dir=str(claims))
    assert share.adjust() == 4 and torch.get_num_threads() == 4  # no folder yet: nothing claimed
    claims.mkdir()
    (claims / "worker0").write_text("2")
    (claims / "worker1").write_text("1")
    (claims / "worker2").write_text("")  # being written: ignored
    assert share.adjust() == 1 and torch.get_num_threads() == 1
    (claims / "worker1").unlink()
    assert share.adjust() == 2 and torch.get_num_threads() == 2
    share.before_forward(None, ())  # the forward pre-hook form: returns None, leaves inputs alone
    assert torch.get_num_threads() == 2


def test_fixed_thread_budget_has_no_share(restore_threads, monkeypatch) -> None:
    import ray

    # Outside Ray, also when the suite's shared Ray cluster is up in this process.
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # restored after the test
        monkeypatch.setenv(name, os.environ.get(name, ""))
    set_thread_budget(1)
    assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
    share = CoreShare.in_this_process(1)  # auto outside Ray: the whole machine, nothing to watch
    assert share.claims_dir is None and share.adjust() == available_cores()
    assert torch.get_num_threads() == available_cores()
