"""Inject every fault the reliability promise covers into real runs and print what happened.

    python -m benchmarks.faults [--workdir DIR]

Each scenario runs `python -m slime.train +experiment=tiny ...` (tiny model, real vLLM engine,
DeepSpeed and Ray) as a subprocess, injects one fault, and reports what the run did, how long the
recovery took and what was lost (tickets trained twice or never, steps logged twice or missing).
The table goes to stdout in Markdown (docs/reliability.md holds the last one measured). The same
helpers drive tests/test_reliability_e2e.py.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Synchronous and seeded: a resumed run can be compared step by step with one that never stopped.
SYNC = [
    "+experiment=tiny",
    "logger.mode=disabled",
    "buffer.max_staleness=0",
    "rollout.seeded_sampling=true",
    "trainer.save_every=1",
]


def log_file(run_dir: Path, name: str):
    """Where a run's own output goes (the table on stdout stays readable)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    return open(run_dir / f"{name}.log", "w")


def cli(run_dir: Path, *overrides: str) -> list[str]:
    """The command line of a synchronous tiny run in `run_dir`."""
    return [sys.executable, "-m", "slime.train", *SYNC, f"hydra.run.dir={run_dir}", *overrides]


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for(predicate: Callable[[], bool], proc: subprocess.Popen, timeout_s: float) -> float:
    """Poll a run's files until `predicate` holds (a separate process offers nothing to await);
    returns the seconds waited. Fails if the run exits first or the time runs out."""
    t0 = time.monotonic()
    while not predicate():
        if proc.poll() is not None:
            raise RuntimeError(f"the run exited early with {proc.returncode}")
        if time.monotonic() - t0 > timeout_s:
            proc.kill()
            raise TimeoutError(f"timed out after {timeout_s}s")
        time.sleep(0.5)
    return time.monotonic() - t0


def is_complete(ckpt: Path) -> bool:
    return (ckpt / "slime_state.json").exists()


def trained_tickets(run_dir: Path) -> list[int]:
    return [t for row in read_jsonl(run_dir / "buffer" / "trained.jsonl") for t in row["tickets"]]


def lost_or_repeated(run_dir: Path, steps: int) -> str:
    """What the run's logs say was lost: steps logged twice or missing, tickets trained twice."""
    logged = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")]
    tickets = trained_tickets(run_dir)
    problems = []
    if logged != list(range(steps)):
        problems.append(f"steps logged {logged}")
    if len(tickets) != len(set(tickets)):
        problems.append(f"{len(tickets) - len(set(tickets))} tickets trained twice")
    return "; ".join(problems) or "nothing"


@dataclass
class Outcome:
    fault: str
    happened: str
    recover_s: float
    lost: str


def kill_driver(work: Path, steps: int = 6) -> Outcome:
    """kill -9 of the driver after its 3rd checkpoint, torn checkpoints planted, then resume=auto."""
    run_dir = work / "kill9"
    out = log_file(run_dir, "first")
    proc = subprocess.Popen(cli(run_dir, f"trainer.steps={steps}"), cwd=REPO, stdout=out, stderr=out)
    wait_for(lambda: is_complete(run_dir / "checkpoints" / "step_000003"), proc, 900)
    proc.send_signal(signal.SIGKILL)
    proc.wait(60)
    plant_torn_checkpoints(run_dir / "checkpoints")
    done_before = len(read_jsonl(run_dir / "metrics.jsonl"))
    t0, wall0 = time.monotonic(), time.time()
    out = log_file(run_dir, "resumed")
    resumed = subprocess.Popen(
        cli(run_dir, f"trainer.steps={steps}", "resume=auto"), cwd=REPO, stdout=out, stderr=out
    )
    resumed_from = max(
        int(p.name[5:]) for p in (run_dir / "checkpoints").iterdir() if is_complete(p) and "." not in p.name
    )
    metrics = run_dir / "metrics.jsonl"
    # The resumed run first cuts the rows after its checkpoint, then logs its first new step.
    wait_for(
        lambda: metrics.stat().st_mtime > wall0 and len(read_jsonl(metrics)) > resumed_from, resumed, 900
    )
    recover_s = time.monotonic() - t0
    resumed.wait(900)
    return Outcome(
        "driver killed (SIGKILL) after step 3, torn checkpoints beside the last good one",
        f"resume=auto took the last complete checkpoint; {done_before} steps were logged at the kill; "
        f"run finished rc {resumed.returncode}",
        recover_s,
        lost_or_repeated(run_dir, steps),
    )


def plant_torn_checkpoints(root: Path) -> None:
    """What a kill in the middle of checkpoint writes leaves: a `.partial` dir (even one whose trainer
    part finished) and a final-named dir without its completion marker."""
    partial = root / "step_000099.partial"
    partial.mkdir()
    (partial / "slime_state.json").write_text('{"step": 99, "version": 99}')
    (root / "step_000098" / "ds").mkdir(parents=True)


def stop_signal(work: Path, sig: signal.Signals) -> Outcome:
    """SIGINT / SIGTERM in the middle of a run, then resume=auto for one more step."""
    run_dir = work / sig.name.lower()
    cmd = cli(run_dir, "trainer.steps=1000", "trainer.save_every=0")
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=log_file(run_dir, "first"), stderr=subprocess.PIPE, text=True
    )
    metrics = run_dir / "metrics.jsonl"
    wait_for(lambda: len(read_jsonl(metrics)) >= 2, proc, 900)
    t0 = time.monotonic()
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=180)
    stop_s = time.monotonic() - t0
    done = len(read_jsonl(metrics))
    ckpt_ok = is_complete(run_dir / "checkpoints" / f"step_{done:06d}")
    out = log_file(run_dir, "resumed")
    subprocess.run(
        cli(run_dir, f"trainer.steps={done + 1}", "resume=auto"),
        cwd=REPO,
        check=True,
        timeout=900,
        stdout=out,
        stderr=out,
    )
    last = [line for line in stderr.splitlines() if line.startswith("slime:")][-1:]
    return Outcome(
        f"{sig.name} during a run",
        f"exit {proc.returncode} in {stop_s:.1f}s, checkpoint of step {done} "
        f"{'complete' if ckpt_ok else 'MISSING'}; said: {last[0] if last else '(nothing)'}",
        stop_s,
        lost_or_repeated(run_dir, done + 1),
    )


def kill_worker(work: Path, steps: int = 4) -> Outcome:
    """The rollout worker's process (the engine runs inside it) killed by its own env mid-run."""
    run_dir = work / "worker"
    marker = work / "worker-killed"
    cmd = cli(
        run_dir,
        f"trainer.steps={steps}",
        "env.name=tests.fault_envs:KillWorkerOnceEnv",
        f"env.kwargs.marker={marker}",
    )
    t0 = time.monotonic()
    out = log_file(run_dir, "run")
    proc = subprocess.run(cmd, cwd=REPO, timeout=1200, stdout=out, stderr=out)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    step_s = [r["time/step_s"] for r in rows]
    slowest = max(step_s, default=0.0)
    typical = sorted(step_s)[len(step_s) // 2] if step_s else 0.0
    return Outcome(
        "rollout worker + engine process killed (SIGKILL) mid-episode",
        f"restarted by Ray, rollout/restarts={rows[-1]['rollout/restarts'] if rows else '?'}, "
        f"run finished rc {proc.returncode} in {time.monotonic() - t0:.0f}s",
        slowest - typical,
        lost_or_repeated(run_dir, steps),
    )


def dapo_livelock(work: Path) -> Outcome:
    """DAPO dynamic sampling on an env whose rewards never vary: every group is dropped."""
    run_dir = work / "dapo"
    cmd = cli(run_dir, "algorithm=dapo", "env.name=tests.fault_envs:ConstantRewardEnv", "trainer.steps=2")
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    said = [line for line in proc.stderr.splitlines() if "dynamic sampling dropped" in line]
    return Outcome(
        "DAPO dynamic sampling with rewards that never vary (the old livelock)",
        f"stopped with rc {proc.returncode}: {said[-1].strip()[:160] if said else '(no message)'}",
        time.monotonic() - t0,
        "nothing (no step could be trained)",
    )


def bad_config(work: Path) -> Outcome:
    """A combination that could never fill a batch, rejected before Ray starts."""
    cmd = cli(work / "bad", "buffer.max_groups=2", "trainer.batch_groups=4")
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    said = [line for line in proc.stderr.splitlines() if line.startswith("slime:")]
    return Outcome(
        "buffer.max_groups < trainer.batch_groups",
        f"rejected before Ray, rc {proc.returncode}: {said[-1][:160] if said else '(no message)'}",
        time.monotonic() - t0,
        "nothing",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="", help="where the runs go (default: a temporary dir)")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="slime-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    scenarios = [
        bad_config,
        kill_driver,
        lambda w: stop_signal(w, signal.SIGINT),
        lambda w: stop_signal(w, signal.SIGTERM),
        kill_worker,
        dapo_livelock,
    ]
    print("| fault | what happened | time to recover (s) | lost |\n|---|---|---|---|")
    for scenario in scenarios:
        o = scenario(work)
        print(f"| {o.fault} | {o.happened} | {o.recover_s:.1f} | {o.lost} |", flush=True)


if __name__ == "__main__":
    main()
