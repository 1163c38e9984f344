"""Evaluation during training: the figures (pure) and a run through the real loop (tiny model)."""

from __future__ import annotations

import json

import pytest
from conftest import make_group, make_trajectory

from slime import api
from slime.metrics import eval_metrics


def test_eval_metrics_by_hand():
    groups = [
        make_group([make_trajectory([1], [2, 3], reward=1.0), make_trajectory([1], [2], reward=0.0)]),
        make_group([make_trajectory([1], [2, 3, 4], reward=0.5), make_trajectory([1], [2], reward=0.0)]),
    ]
    m = eval_metrics(groups, success=1.0)
    assert m["eval/reward_mean"] == pytest.approx(1.5 / 4)
    assert m["eval/pass@1"] == pytest.approx(1 / 4)  # one solved sample of four
    assert m["eval/pass@k"] == pytest.approx(1 / 2)  # one of two tasks solved at least once
    assert m["eval/k"] == 2.0 and m["eval/num_tasks"] == 2.0
    assert m["eval/len_mean"] == pytest.approx((2 + 1 + 3 + 1) / 4)
    assert eval_metrics(groups, success=0.5)["eval/pass@k"] == 1.0


@pytest.mark.slow
def test_eval_rows_through_the_real_loop(tmp_path, ray_cluster):
    rows = api.run(
        ["+experiment=tiny", "trainer.steps=2", "eval.every=2", "eval.num_tasks=6", "eval.n=2"],
        run_dir=str(tmp_path),
    )
    assert [r["step"] for r in rows] == [0, 1]  # the returned rows are the training steps
    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in logged if r.get("eval")]
    assert [r["step"] for r in evals] == [0, 2]  # at the start and after the last step
    assert [r["version"] for r in evals] == [0, 2]
    for r in evals:
        assert r["eval/num_tasks"] == 6 and r["eval/k"] == 2
        assert 0.0 <= r["eval/pass@1"] <= r["eval/pass@k"] <= 1.0
        assert r["eval/len_mean"] > 0 and r["eval/failed"] == 0
    assert not any(k.startswith("eval/") for r in logged if not r.get("eval") for k in r)
