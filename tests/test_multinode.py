"""A real multi-node Ray cluster on this machine (Ray's `ray.cluster_utils.Cluster`, a raylet per
node; tests/multinode_run.py in a process of its own): the rollout workers spread over both nodes,
the weights reach the remote one by broadcast, and the loop trains; then the node holding a rollout
worker is removed mid-run: the worker comes back on the surviving node at the current version, the
run finishes, and no ticket is lost or trained twice."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TWO_NODES = [
    "+experiment=tiny",
    "rollout.num_workers=2",
    "rollout.num_cpus_per_worker=0.5",  # room on one node for both workers after the other is gone
    "buffer.max_staleness=0",
    "logger.mode=disabled",
]


def _run(run_dir: Path, *args: str) -> dict:
    out = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "multinode_run.py"), str(run_dir), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    (last,) = [line for line in out.stdout.splitlines() if line.startswith("{")][-1:]
    report = json.loads(last)
    report["console"] = out.stderr
    return report


def _trained_tickets(run_dir: Path) -> list[int]:
    rows = [json.loads(x) for x in (run_dir / "buffer" / "trained.jsonl").read_text().splitlines()]
    return [t for r in rows for t in r["tickets"]]


@pytest.mark.slow
def test_two_nodes_train_with_a_broadcast_push_and_survive_losing_a_worker_node(tmp_path):
    # The run goes on until the lost worker's engine has started again on the head node (30-120 s
    # under load, seconds of steps when idle) and both workers have generated for two steps, then
    # stops cleanly (SIGINT); trainer.steps is only the cap.
    report = _run(
        tmp_path, "--kill-worker-node-after-step", "2", "--stop-when-back", *TWO_NODES, "trainer.steps=400"
    )
    assert sorted(set(report["started_on"].values())) == sorted([report["head"], report["second"]])
    assert "weights: broadcast transport" in report["console"]
    assert "stopped by SIGINT" in report.get("stopped", ""), report["console"][-3000:]
    rows = report["rows"]
    n = len(rows)
    assert n >= 4 and [r["step"] for r in rows] == list(range(n))
    assert rows[-1]["rollout/restarts"] >= 1
    assert set(report["after_loss"].values()) == {report["head"]}  # the lost worker is back on the head node
    tickets = _trained_tickets(tmp_path)
    assert sorted(tickets) == list(range(n * 4))  # synchronous: every ticket trained once, none lost
    back = [line for line in report["console"].splitlines() if " back in " in line]
    assert back, report["console"][-3000:]
    print("recovery:", back[-1])
    # Back at the current version and generating again: tokens from both workers in the last steps.
    assert (
        sum(
            r.get("rollout/worker0/tokens_per_s", 0) > 0 and r.get("rollout/worker1/tokens_per_s", 0) > 0
            for r in rows[-2:]
        )
        >= 1
    )
