"""A run survives faults and resumes exactly (real vLLM engine, DeepSpeed, Ray; tiny model).

- kill -9 of the driver after step 3, then `resume=auto`: every step logged once, versions continue,
  each ticket trained once, and (synchronous, seeded sampling) the same data, rewards and losses as a
  run that never stopped; torn checkpoints left beside it are never resumed from.
- SIGINT or SIGTERM mid-run: a checkpointed exit within the bound, with a line saying how to resume.
- A rollout worker's process (and so its engine) killed mid-run: Ray restarts it, its tickets are
  generated again, the run finishes, `rollout/restarts` is 1.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from benchmarks.faults import (
    REPO,
    cli,
    is_complete,
    plant_torn_checkpoints,
    read_jsonl,
    trained_tickets,
    wait_for,
)
from slime import api

STEPS = 6
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    subprocess.run(cli(run_dir, f"trainer.steps={STEPS}"), check=True, timeout=900, cwd=REPO)
    return run_dir


def test_kill_9_then_resume_continues_exactly(uninterrupted: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(cli(run_dir, f"trainer.steps={STEPS}"), cwd=REPO)
    wait_for(lambda: is_complete(run_dir / "checkpoints" / "step_000003"), proc, timeout_s=900)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert len(read_jsonl(run_dir / "metrics.jsonl")) >= 3
    plant_torn_checkpoints(run_dir / "checkpoints")

    subprocess.run(cli(run_dir, f"trainer.steps={STEPS}", "resume=auto"), check=True, timeout=900, cwd=REPO)

    rows, ref_rows = read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(uninterrupted / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(STEPS))  # every step once, no gap
    assert [r["version"] for r in rows] == list(range(1, STEPS + 1))
    trained = read_jsonl(run_dir / "buffer/trained.jsonl")
    assert [t["step"] for t in trained] == list(range(STEPS))
    tickets = trained_tickets(run_dir)
    assert tickets == trained_tickets(uninterrupted)  # the same tickets, each once, in the same order
    assert len(tickets) == len(set(tickets))
    ref_trained = read_jsonl(uninterrupted / "buffer/trained.jsonl")
    assert [row["tasks"] for row in trained] == [row["tasks"] for row in ref_trained]
    # Synchronous, seeded sampling, the same weights and optimizer state: the same episodes and losses
    # (engine batches differ after the restart, so logits may differ in the last bits).
    for r, ref in zip(rows, ref_rows, strict=True):
        assert r["reward/mean"] == pytest.approx(ref["reward/mean"], abs=0.05), r["step"]
        assert r["loss/policy"] == pytest.approx(ref["loss/policy"], abs=2e-3), r["step"]
    assert not (run_dir / "checkpoints" / "step_000099").exists()  # the torn ones were never published


@pytest.mark.parametrize(
    "sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"]
)  # Ctrl-C; preemption
def test_a_stop_signal_checkpoints_and_exits_within_the_bound(sig: signal.Signals, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cmd = cli(run_dir, "trainer.steps=1000", "trainer.save_every=0", "trainer.stop_timeout_s=60")
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    wait_for(lambda: len(read_jsonl(metrics)) >= 2, proc, timeout_s=900)
    t0 = time.monotonic()
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    stop_s = time.monotonic() - t0
    assert proc.returncode == 128 + sig, stderr[-2000:]
    assert stop_s < 60 + 10, stop_s
    assert "Traceback" not in stderr, stderr[-3000:]
    done = len(read_jsonl(metrics))
    ckpt = run_dir / "checkpoints" / f"step_{done:06d}"
    assert is_complete(ckpt)
    assert f"resume={ckpt}" in stderr

    subprocess.run(
        cli(run_dir, f"trainer.steps={done + 1}", "resume=auto"), check=True, timeout=900, cwd=REPO
    )
    assert [r["step"] for r in read_jsonl(metrics)] == list(range(done + 1))


def test_a_killed_rollout_worker_is_restarted(tmp_path: Path, ray_cluster) -> None:
    marker = tmp_path / "killed-once"
    rows = api.run(
        [
            "+experiment=tiny",
            "trainer.steps=3",
            "env.name=tests.fault_envs:KillWorkerOnceEnv",
            f"env.kwargs.marker={marker}",
        ],
        run_dir=str(tmp_path / "run"),
    )
    assert marker.exists()  # the fault really happened
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[-1]["rollout/restarts"] == 1
    tickets = trained_tickets(tmp_path / "run")
    assert len(tickets) == len(set(tickets)) == 3 * 4
