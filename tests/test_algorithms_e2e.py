"""Every algorithm runs through the real loop (vLLM + DeepSpeed + Ray) and shows what only it does;
a pip-installed plugin environment trains by its entry-point name from the command line.

The runs are synchronous (`buffer.max_staleness=0`), so batch k is exactly the groups of admission
tickets kB..kB+B-1, which the buffer records in `buffer/groups.jsonl`: the test recomputes each
algorithm's advantages from those rewards with the formulas written out below and compares them with
the trainer's `adv/mean` and `adv/std` (token-weighted, unbiased). GSPO's sequence-level ratio, DAPO's
dynamic sampling and PPO's critic and whitening have their own checks.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from slime import api
from slime.core.model import resolve_dtype

REPO = Path(__file__).resolve().parents[1]
ALGORITHMS = ["grpo", "dr_grpo", "dapo", "gspo", "rloo", "reinforce_pp", "ppo"]
BATCH_GROUPS = 4  # trainer.batch_groups of +experiment=tiny
STD_EPS = 1e-6  # added to standard deviations before dividing (docs/algorithms.md)
Rows = list[dict[str, Any]]


# ---------------------------------------------------------------------------- hand-written advantages
def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _std(xs: list[float]) -> float:
    """Unbiased (n - 1) standard deviation."""
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _grpo(groups: list[list[float]]) -> list[list[float]]:
    return [[(r - _mean(g)) / (_std(g) + STD_EPS) for r in g] for g in groups]


def _dr_grpo(groups: list[list[float]]) -> list[list[float]]:
    return [[r - _mean(g) for r in g] for g in groups]


def _rloo(groups: list[list[float]]) -> list[list[float]]:
    return [[r - (sum(g) - r) / (len(g) - 1) for r in g] for g in groups]


def _reinforce_pp(groups: list[list[float]]) -> list[list[float]]:
    centred = _dr_grpo(groups)
    scale = _std([a for g in centred for a in g]) + STD_EPS
    return [[a / scale for a in g] for g in centred]


ADVANTAGES: dict[str, Callable[[list[list[float]]], list[list[float]]]] = {
    "grpo": _grpo,
    "gspo": _grpo,
    "dr_grpo": _dr_grpo,
    "rloo": _rloo,
    "reinforce_pp": _reinforce_pp,
}


def _batches(run_dir: Path, steps: int) -> list[list[dict[str, Any]]]:
    """The recorded groups of each trained batch (synchronous run: tickets kB..kB+B-1)."""
    lines = (run_dir / "buffer" / "groups.jsonl").read_text().splitlines()
    by_ticket = {g["ticket"]: g for g in map(json.loads, lines)}
    return [[by_ticket[t] for t in range(k * BATCH_GROUPS, (k + 1) * BATCH_GROUPS)] for k in range(steps)]


def _lengths(batch: list[dict[str, Any]]) -> list[list[int]]:
    return [[sum(t["loss_mask"]) for t in g["trajectories"]] for g in batch]


def _check_advantages(algorithm: str, rows: Rows, run_dir: Path) -> None:
    for k, (row, batch) in enumerate(zip(rows, _batches(run_dir, len(rows)), strict=True)):
        rewards = [[t["reward"] for t in g["trajectories"]] for g in batch]
        assert row["reward/mean"] == pytest.approx(_mean([r for g in rewards for r in g]), abs=1e-9)
        adv = ADVANTAGES[algorithm](rewards)
        # Each sequence's advantage sits on each of its generated tokens.
        tokens = [
            (a, n) for ga, gn in zip(adv, _lengths(batch), strict=True) for a, n in zip(ga, gn, strict=True)
        ]
        count = sum(n for _, n in tokens)
        mean = sum(a * n for a, n in tokens) / count
        std = math.sqrt(max(sum(a * a * n for a, n in tokens) - count * mean * mean, 0.0) / (count - 1))
        assert row["train/loss_tokens"] == count, k
        assert row["adv/mean"] == pytest.approx(mean, rel=1e-4, abs=1e-5), (k, row["adv/mean"], mean)
        assert row["adv/std"] == pytest.approx(std, rel=1e-4, abs=1e-5), (k, row["adv/std"], std)
        assert std > 0.05, "no signal in the batch: the check above would not tell estimators apart"


def _subset_sums(values: list[int]) -> set[int]:
    sums = {0}
    for v in values:
        sums |= {s + v for s in sums}
    return sums


def _check_gspo(rows: Rows, run_dir: Path) -> None:
    """One ratio per sequence: with two updates on each batch (`algorithm.ppo_epochs=2`) the second
    one clips whole sequences, so the clipped tokens are a sum of whole sequence lengths. A
    token-level ratio clips single tokens (with GSPO's narrow range, most but not all of a sequence)."""
    _check_advantages("gspo", rows, run_dir)
    for k, (row, batch) in enumerate(zip(rows, _batches(run_dir, len(rows)), strict=True)):
        lengths = [n for g in _lengths(batch) for n in g]
        clipped = row["clip_frac"] * 2 * sum(lengths)  # over both epochs' tokens
        assert any(abs(clipped - s) < 1e-2 for s in _subset_sums(lengths)), (k, clipped, lengths)
    assert any(r["clip_frac"] > 0 for r in rows), "nothing clipped: the check above is vacuous"


def _check_dapo(rows: Rows, run_dir: Path) -> None:
    """Binary rewards in groups of two (see the overrides): dynamic sampling keeps only {0, 1} groups,
    so every trained batch has mean and std exactly 0.5, and the dropped ones are counted."""
    for r in rows:
        assert (r["reward/mean"], r["reward/std"]) == (0.5, 0.5), (r["reward/mean"], r["reward/std"])
    assert sum(r["buffer/dropped_zero_variance"] for r in rows) > 0


def _check_ppo(rows: Rows, run_dir: Path) -> None:
    """A critic trains beside the policy: its head starts at zero (values 0 on the first step), its
    loss is finite and falls; GAE advantages are whitened over the batch's tokens."""
    for r in rows:
        assert r["adv/mean"] == pytest.approx(0.0, abs=1e-4) and r["adv/std"] == pytest.approx(1.0, abs=1e-3)
        assert math.isfinite(r["loss/value"]) and r["loss/value"] > 0
        assert math.isfinite(r["critic/grad_norm"]) and r["critic/grad_norm"] > 0
    assert rows[0]["value/mean"] == 0.0
    # Rewards are in [0, 1] (about 0.6 here): the values rise from 0 towards the returns.
    assert rows[-1]["value/mean"] > 0.0, [r["value/mean"] for r in rows]
    losses = [r["loss/value"] for r in rows]
    print("value loss per step", losses)
    assert losses == sorted(losses, reverse=True) and losses[-1] < 0.6 * losses[0], losses


CHECKS: dict[str, Callable[[Rows, Path], None]] = {
    "grpo": lambda rows, d: _check_advantages("grpo", rows, d),
    "dr_grpo": lambda rows, d: _check_advantages("dr_grpo", rows, d),
    "rloo": lambda rows, d: _check_advantages("rloo", rows, d),
    "reinforce_pp": lambda rows, d: _check_advantages("reinforce_pp", rows, d),
    "gspo": _check_gspo,
    "dapo": _check_dapo,
    "ppo": _check_ppo,
}
EXTRA = {
    # below temperature 1: engine and trainer must both score softmax(logits / T)
    "grpo": ["rollout.temperature=0.7"],
    "gspo": ["algorithm.ppo_epochs=2"],
    # First-word reward (0 or 1) in groups of two: about half the groups have no variance. The
    # overlong ramp must fit the 16-token limit.
    "dapo": ["rollout.group_size=2", "++env.kwargs.max_words=1", "algorithm.overlong_buffer=8"],
    # A faster critic, so that its loss visibly falls within the run.
    "ppo": ["algorithm.critic_lr=3e-3"],
}
STEPS = {"ppo": 3}


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_algorithm_runs_through_the_real_loop(algorithm, tmp_path, ray_cluster):
    steps = STEPS.get(algorithm, 2)
    overrides = [
        "+experiment=tiny",
        f"algorithm={algorithm}",
        f"trainer.steps={steps}",
        "buffer.max_staleness=0",
    ]
    rows = api.run(overrides + EXTRA.get(algorithm, []), run_dir=str(tmp_path))
    assert [r["version"] for r in rows] == list(range(1, steps + 1))
    for r in rows:
        for key in ("loss/policy", "entropy", "clip_frac", "is_ratio/mean", "mismatch/logprob_abs"):
            assert math.isfinite(r[key]), (key, r[key])
    # Step 0 trains on version-0 data only: engine and trainer score the same tokens with the same weights
    # (float32 agrees to ~1e-6; scoring at the wrong temperature is off by > 1e-2).
    tol = 1e-3 if resolve_dtype("auto") == "float32" else 1e-2
    assert rows[0]["mismatch/logprob_abs"] < tol, rows[0]["mismatch/logprob_abs"]
    CHECKS[algorithm](rows, tmp_path)


@pytest.mark.slow
def test_plugin_env_trains_by_entry_point_name(tmp_path):
    """`pip install` the example package, then `python -m slime.train env.name=reverse` finds it."""
    site = tmp_path / "site"
    src = tmp_path / "src"
    subprocess.run(["cp", "-r", str(REPO / "examples" / "slime-env-example"), str(src)], check=True)
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    subprocess.run([*pip, "--target", str(site), str(src)], check=True, capture_output=True, timeout=300)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "slime.train",
            "+experiment=tiny",
            "env.name=reverse",
            "trainer.steps=2",
            "ray.num_cpus=2",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[-1]["episode/failed"] == 0
