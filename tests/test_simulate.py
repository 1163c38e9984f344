"""The scheduling simulator (slime/simulate/): hand-checkable loops, admission, engine batching,
partial rollouts, shared cores, and calibration recovering the speeds of a run it simulated itself.

No Ray, no engine: pure Python, a second or two.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from slime.simulate import cli
from slime.simulate.calibration import calibrate, measured_summary, read_run
from slime.simulate.model import Simulation, predict, simulate, summarize
from slime.simulate.params import Dist, Params, RecordedEpisode, parse_setting

INF = 1e12  # b_sat: an engine whose sequences never slow each other down


def _params(**kw) -> Params:
    """One engine, 4 loops, groups of 4, batches of 4 groups, 16 tokens per episode at 8 tok/s each
    (G = 2 s), training 3 s, push 0.5 + 0.25 s, no other cost."""
    base = dict(
        num_workers=1,
        max_concurrent_groups=4,
        group_size=4,
        seq_tok_s=8.0,
        b_sat=INF,
        tokens_per_turn=Dist("fixed", 16.0),
        prompt_tokens=0.0,
        batch_groups=4,
        train_fixed_s=3.0,
        train_tok_s=INF,
        export_s=0.5,
        load_s=0.25,
        max_staleness=0,
        steps=6,
    )
    return Params(**{**base, **kw})


def test_sync_step_is_generation_plus_training_plus_push() -> None:
    records = simulate(_params())
    for r in records:
        assert r.step_s == pytest.approx(2.0 + 3.0 + 0.75)
        assert r.wait_s == pytest.approx(2.0)
        assert r.sync_s == pytest.approx(0.75)
        assert r.staleness_max == 0
    s = summarize(records)
    assert s["trainer_idle_frac"] == pytest.approx(1 - 3.0 / 5.75)
    # the controller's bookkeeping after a push overlaps the next batch's generation (the window is
    # already open): it costs a step only what it lasts beyond G
    r = simulate(_params(overhead_s=0.4))[3]
    assert (r.step_s, r.wait_s) == pytest.approx((5.75, 1.6))
    assert simulate(_params(overhead_s=2.5))[3].step_s == pytest.approx(2.5 + 3.0 + 0.75)


def test_async_step_is_training_plus_push_when_training_is_longer() -> None:
    records = simulate(_params(max_staleness=1))
    assert records[0].step_s == pytest.approx(2.0 + 3.0 + 0.75)  # the first batch is waited for
    for r in records[1:]:
        assert r.step_s == pytest.approx(3.0 + 0.75)
        assert r.wait_s == pytest.approx(0.0)
        assert r.staleness_mean == pytest.approx(1.0)
        assert r.staleness_max == 1


def test_async_step_is_generation_when_generation_is_longer() -> None:
    # G = 16 / 2 = 8 s > T + P: the trainer waits, one batch per G plus the engines' load pause
    records = simulate(_params(max_staleness=1, seq_tok_s=2.0, steps=8))
    for r in records[2:]:
        assert r.step_s == pytest.approx(8.0 + 0.25)


@pytest.mark.parametrize("staleness", [0, 1, 2, 4])
def test_admission_never_issues_more_than_the_window(staleness: int) -> None:
    # fast generation, slow training: the loops always want more tickets than admission allows
    p = _params(max_staleness=staleness, max_concurrent_groups=64, seq_tok_s=1000.0, steps=10)
    s = Simulation(p)
    s.run()
    assert s.max_ahead == (staleness + 1) * p.batch_groups


def test_engine_batching_follows_the_curve() -> None:
    # 16 sequences of 16 tokens at once: each gets seq_tok_s / (1 + 16 / b_sat)
    p = _params(seq_tok_s=10.0, b_sat=16.0)
    assert p.engine_tok_s(16) == pytest.approx(10.0 * 16 / 2)
    records = simulate(p)
    assert records[1].wait_s == pytest.approx(16 / (10.0 / 2))
    assert records[1].gen_tokens == pytest.approx(16 * 16)


def test_processor_sharing_speeds_up_the_sequences_left() -> None:
    # b_sat 1: one sequence alone runs at a/2, two at a/3 each. With a = 6: both run at 2 tok/s
    # until the 10-token one ends at 5 s; the 30-token one has 20 left at 3 tok/s: 6.667 s more.
    rec = ((RecordedEpisode(1, 10, 0.0, 10), RecordedEpisode(1, 30, 0.0, 30)),)
    p = _params(
        seq_tok_s=6.0,
        b_sat=1.0,
        group_size=2,
        max_concurrent_groups=1,
        batch_groups=1,
        turns=Dist("recorded"),
        tokens_per_turn=Dist("recorded"),
        latency_s=Dist("recorded"),
        recorded=rec,
        steps=2,
    )
    s = Simulation(p)
    s.keep_groups = True
    records = s.run()
    assert records[0].wait_s == pytest.approx(5.0 + 20 / 3)
    assert sorted(ep.generate_s for ep in s.finished[0].episodes) == pytest.approx([5.0, 5.0 + 20 / 3])


def test_multi_turn_episodes_wait_for_the_environment() -> None:
    # 3 turns of 16 tokens (2 s each) with 1 s of tool latency after each: 9 s per episode
    p = _params(turns=Dist("fixed", 3.0), latency_s=Dist("fixed", 1.0), turn_overhead_s=0.5)
    records = simulate(p)
    assert records[1].wait_s == pytest.approx(3 * (0.5 + 2.0 + 1.0))
    assert records[1].trained_tokens == pytest.approx(16 * 3 * 16)


def test_partial_rollouts_carry_two_versions() -> None:
    # B = 1 group of 1 episode of 3 tokens at 1 tok/s; S = 1; training 2 s; instant push.
    # t=0: tickets 0, 1 start (window 2); t=3 both done, ticket 0 trains to t=5 (version 1);
    # ticket 2 starts at 5, ticket 1 trains 5-7; ticket 2 has 2 tokens of version 1 when version 2
    # lands at 7 and its last token is version 2; it trains at version 2 from t=8.
    p = _params(
        seq_tok_s=1.0,
        group_size=1,
        batch_groups=1,
        max_concurrent_groups=2,
        tokens_per_turn=Dist("fixed", 3.0),
        train_fixed_s=2.0,
        export_s=0.0,
        load_s=0.0,
        max_staleness=1,
        steps=3,
    )
    r0, r1, r2 = simulate(p)
    assert (r0.step_s, r1.step_s, r2.step_s) == pytest.approx((5.0, 2.0, 3.0))
    assert (r1.staleness_mean, r1.partial_episodes) == (1.0, 0)
    assert r2.staleness_mean == pytest.approx(2 / 3)
    assert (r2.staleness_max, r2.partial_episodes) == (1, 1)
    # within the bound: mask loses nothing
    assert simulate(p.with_(stale_tokens="mask"))[2].tokens_lost_stale == 0


def test_stale_tokens_policies_on_a_heavy_tail() -> None:
    # heavy-tailed lengths at S = 1: some episodes outlive several pushes. keep trains their old
    # tokens (staleness past the bound), mask counts them as lost, drop_group drops and refunds the
    # groups (never past the bound, at the cost of regenerating them)
    p = _params(
        max_staleness=1,
        tokens_per_turn=Dist("lognormal", 16, 1.5),
        max_concurrent_groups=8,
        train_fixed_s=1.0,
        steps=30,
    )
    keep = simulate(p)
    assert max(r.staleness_max for r in keep) > 1
    assert sum(r.dropped_stale for r in keep) == 0
    assert sum(r.tokens_lost_stale for r in keep) == 0
    mask = simulate(p.with_(stale_tokens="mask"))
    assert sum(r.tokens_lost_stale for r in mask) > 0
    drop = simulate(p.with_(stale_tokens="drop_group"))
    assert max(r.staleness_max for r in drop) <= 1
    assert sum(r.dropped_stale for r in drop) > 0
    assert summarize(drop)["step_s"] > summarize(keep)["step_s"]


def test_shared_cores_slow_down_what_runs_together() -> None:
    # one core; the engine (1 thread) decodes ticket 1 while the trainer (1 thread) trains batch 0:
    # both run at half speed, so 1 s of training takes 2 s
    p = _params(
        group_size=1,
        batch_groups=1,
        max_concurrent_groups=1,
        seq_tok_s=10.0,
        tokens_per_turn=Dist("fixed", 100.0),
        train_fixed_s=1.0,
        export_s=0.0,
        load_s=0.0,
        max_staleness=1,
        cores=1.0,
        steps=2,
    )
    records = simulate(p)
    assert records[0].wait_s == pytest.approx(10.0)
    assert records[0].train_s == pytest.approx(2.0)
    assert records[0].train_work_s == pytest.approx(1.0)
    # synchronous: nothing runs together, cores change nothing
    sync = _params(cores=1.0)
    assert [r.step_s for r in simulate(sync)] == pytest.approx(
        [r.step_s for r in simulate(sync.with_(cores=0))]
    )


def test_deterministic_given_a_seed() -> None:
    p = _params(turns=Dist("randint", 1, 4), latency_s=Dist("lognormal", 0.5, 1.0), max_staleness=1)
    a = [r.step_s for r in simulate(p)]
    assert a == [r.step_s for r in simulate(p)]
    assert a != [r.step_s for r in simulate(p.with_(seed=1))]


def test_distributions_parse_and_sample() -> None:
    assert Dist.parse("3") == Dist("fixed", 3.0)
    assert Dist.parse("lognormal:2:0.5") == Dist("lognormal", 2.0, 0.5)
    assert Dist.parse("randint:2:4").mean() == 3.0
    assert Dist.parse("choice:1,2,6").mean() == 3.0
    assert str(Dist.parse("uniform:1:2")) == "uniform:1:2"
    with pytest.raises(ValueError, match="cannot read"):
        Dist.parse("gamma:1")
    with pytest.raises(ValueError, match="recorded episodes"):
        Params(turns=Dist("recorded"))
    assert parse_setting("latency_s=lognormal:2:1") == ("latency_s", Dist("lognormal", 2.0, 1.0))
    assert parse_setting("num_workers=4") == ("num_workers", 4)
    with pytest.raises(ValueError, match="expected key=value"):
        parse_setting("workers=4")


# ------------------------------------------------------------------------------ calibration


def _write_run(path: Path, p: Params) -> None:
    """A run dir in slime's format whose timings come from simulating `p` (steps 0.. of it)."""
    s = Simulation(p)
    s.keep_groups = True
    records = s.run()
    path.mkdir(parents=True)
    (path / "buffer").mkdir()
    config = {
        "rollout": {
            "num_workers": p.num_workers,
            "max_concurrent_groups": p.max_concurrent_groups,
            "group_size": p.group_size,
            "threads_per_worker": p.engine_threads,
            "gpus_per_worker": 1.0,
        },
        "trainer": {
            "num_ranks": 1,
            "batch_groups": p.batch_groups,
            "threads_per_rank": 1,
            "gpus_per_rank": 1.0,
        },
        "buffer": {"max_staleness": p.max_staleness, "stale_tokens": p.stale_tokens},
        "env": {},
        "ray": {"num_cpus": 0},
    }
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    with open(path / "metrics.jsonl", "w") as m, open(path / "buffer" / "trained.jsonl", "w") as t:
        for r in records:
            row = {
                "step": r.step,
                "time/step_s": r.step_s,
                "time/wait_s": r.wait_s,
                "time/train_s": r.train_s,
                "time/sync_s": r.sync_s,
                "time/engine_load_s": p.load_s,
                "time/gen_s": r.gen_s,
                "train/tokens": r.trained_tokens,
                "perf/train_tokens_per_s": r.trained_tokens / r.train_s,
                "perf/rollout_tokens_per_s": r.gen_tokens / r.step_s,
                "staleness/mean": r.staleness_mean,
                "staleness/max": float(r.staleness_max),
                "batch/trajectories": float(r.episodes),
                "episode/count": float(r.episodes),
            }
            m.write(json.dumps(row) + "\n")
            t.write(json.dumps({"step": r.step, "tickets": list(r.tickets)}) + "\n")
    with open(path / "buffer" / "groups.jsonl", "w") as g:
        for ticket, group in sorted(s.finished.items()):
            trajs = []
            for i, ep in enumerate(group.episodes):
                generated = round(sum(n for n, _ in ep.plan))
                prompt = round(ep.trained_tokens) - generated
                trajs.append(
                    {
                        "turns": len(ep.plan),
                        "versions": [-1] * prompt + [0] * generated,
                        "token_ids": [0] * (prompt + generated),
                        "episode_id": f"{ticket}-{i}",
                        "timings": {"generate_s": ep.generate_s, "env_s": sum(lat for _, lat in ep.plan)},
                    }
                )
            g.write(json.dumps({"ticket": ticket, "trajectories": trajs}) + "\n")


def test_calibration_recovers_the_speeds_of_a_simulated_run(tmp_path: Path) -> None:
    truth = _params(
        seq_tok_s=12.0,
        b_sat=32.0,
        max_staleness=1,
        turns=Dist("randint", 1, 3),
        tokens_per_turn=Dist("uniform", 8, 24),
        latency_s=Dist("fixed", 0.3),
        prompt_tokens=40.0,
        train_fixed_s=0.5,
        train_tok_s=800.0,
        overhead_s=0.1,
        steps=16,
    )
    _write_run(tmp_path / "run", truth)
    fitted, notes = calibrate(str(tmp_path / "run"), base=Params(b_sat=32.0))
    assert notes["engine_fit"] == "episode generate_s"
    assert fitted.seq_tok_s == pytest.approx(12.0, rel=0.05)
    assert fitted.train_fixed_s == pytest.approx(0.5, rel=0.05)
    assert fitted.train_tok_s == pytest.approx(800.0, rel=0.05)
    assert (fitted.export_s, fitted.load_s, fitted.overhead_s) == pytest.approx((0.5, 0.25, 0.1))
    assert fitted.cores == 0  # GPUs in the config
    measured = measured_summary(read_run(str(tmp_path / "run")))
    assert predict(fitted)["step_s"] == pytest.approx(measured["step_s"], rel=0.05)
    # another shape from the same fit: synchronous is slower, a wider window no slower
    assert predict(fitted.with_(max_staleness=0))["step_s"] > measured["step_s"]
    assert predict(fitted.with_(max_staleness=2))["step_s"] <= measured["step_s"] * 1.02


def test_cli_prints_a_sweep_and_a_comparison(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_run(tmp_path / "run", _params(max_staleness=1, steps=8))
    assert cli.main([str(tmp_path / "run"), "--sweep", "num_workers=1,2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["num_workers"] for r in rows] == ["1", "2"]
    assert cli.main([str(tmp_path / "run"), "--compare", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "measured step s" in out and "from RUN_DIR" in out
    assert cli.main(["--set", "max_staleness=0", "--set", "steps=5"]) == 0
    assert "predicted" in capsys.readouterr().out
    # a run packed into one small JSON file calibrates exactly as its run dir
    packed = str(tmp_path / "run.json")
    assert cli.main([str(tmp_path / "run"), "--pack", packed]) == 0
    capsys.readouterr()
    from_dir, _ = calibrate(str(tmp_path / "run"))
    from_json, _ = calibrate(packed)
    assert from_json.seq_tok_s == pytest.approx(from_dir.seq_tok_s, rel=1e-3)
    assert predict(from_json)["step_s"] == pytest.approx(predict(from_dir)["step_s"], rel=1e-3)
