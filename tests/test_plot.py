"""Runs you can look at: `python -m slime.plot` PNG panels, wandb sections and full-conversation samples.

No Ray, no engine: metrics.jsonl files are written here; wandb is a recording fake, plus one real
offline run to show the wandb calls are accepted.
"""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import pytest

from slime import plot
from slime.core.config import LoggerConfig
from slime.core.types import Group, Status, Task, Trajectory
from slime.metrics import METRIC_SECTIONS, SAMPLE_COLUMNS, MetricsLogger, define_sections

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _row(step: int, reward: float, mismatch: bool = True) -> dict:
    row = {
        "step": step,
        "version": step + 1,
        "reward/mean": reward,
        "reward/std": 0.1,
        "staleness/mean": 0.5,
        "staleness/max": 1.0,
        "time/step_s": 2.0,
        "time/train_s": 1.2,
        "time/sync_s": 0.3,
        "time/wait_s": 0.5,
        "perf/trainer_idle_frac": 0.4,
        "response/len_mean": 12.0,
    }
    if mismatch:
        row["mismatch/logprob_abs"] = 1e-3
    return row


def _write_run(run_dir: Path, rows: list[dict], tail: str = "") -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return run_dir


@pytest.fixture()
def two_runs(tmp_path: Path) -> tuple[Path, Path]:
    # Run a: eval rows at steps 4 and 9, and a last line cut short by a kill.
    rows_a = [_row(s, 0.1 * s) for s in range(10)]
    rows_a += [
        {"step": 4, "eval/reward/mean": 0.45, "eval/reward/std": 0.2},
        {"step": 9, "eval/reward/mean": 0.9},
    ]
    a = _write_run(tmp_path / "async", rows_a, tail='{"step": 10, "reward/me')
    # Run b: no mismatch metric at all, fewer steps.
    b = _write_run(tmp_path / "sync", [_row(s, 0.05 * s, mismatch=False) for s in range(6)])
    return a, b


def _panel(fig, title: str):
    (ax,) = [ax for ax in fig.axes if ax.get_title() == title]
    return ax


def test_plot_compares_runs_on_one_figure(two_runs, tmp_path: Path):
    a, b = two_runs
    out = tmp_path / "cmp.png"
    assert plot.main([str(a), str(b), "-o", str(out)]) == out
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 20_000

    runs = plot.load_runs([a, b])
    assert [r.label for r in runs] == ["async", "sync"]
    assert [len(r.rows) for r in runs] == [12, 6]  # the cut-short line is skipped
    fig = plot.plot_runs(runs, tmp_path / "again.png")
    reward = _panel(fig, "reward")
    labels = [line.get_label() for line in reward.get_lines()]
    assert labels == ["async", "async eval/reward/mean", "sync"]
    evals = reward.get_lines()[1]
    assert list(evals.get_xdata()) == [4.0, 9.0] and list(evals.get_ydata()) == [0.45, 0.9]
    # One colour per run, the same in every panel.
    colours = {line.get_label(): line.get_color() for ax in fig.axes for line in ax.get_lines()}
    assert colours["async"] == colours["async eval/reward/mean"] == colours["async train"]
    assert colours["sync"] == colours["sync train"] != colours["async"]
    time_labels = [line.get_label() for line in _panel(fig, "time per step (s)").get_lines()]
    assert time_labels == [f"{r} {k}" for r in ("async", "sync") for k in ("train", "sync", "wait")]
    mismatch = _panel(fig, "mismatch |engine - trainer logprob|")
    assert [line.get_label() for line in mismatch.get_lines()] == ["async"]
    assert list(_panel(fig, "trainer idle fraction").get_lines()[1].get_xdata()) == [
        float(s) for s in range(6)
    ]
    assert {p[0] for p in plot.PANELS} == {ax.get_title() for ax in fig.axes if ax.get_visible()}


def test_default_output_and_missing_data(tmp_path: Path):
    run = _write_run(
        tmp_path / "outputs" / "x", [{"step": 0, "reward/mean": 0.5}, {"step": 1, "reward/mean": 0.7}]
    )
    out = plot.main([str(run / "metrics.jsonl")])
    assert out == run / "metrics.png" and out.read_bytes().startswith(PNG_MAGIC)
    fig = plot.plot_runs(plot.load_runs([run]), tmp_path / "one.png")
    assert [t.get_text() for t in _panel(fig, "staleness (policy versions)").texts] == ["no data"]
    assert _panel(fig, "reward").get_lines()[0].get_label() == "x"
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        plot.main([str(tmp_path / "nope")])


def test_run_labels_are_distinct():
    assert plot.run_labels(["/r/2024-01-01/12-00-00", "/r/2024-01-02/12-00-00"]) == [
        "2024-01-01/12-00-00",
        "2024-01-02/12-00-00",
    ]
    assert plot.run_labels(["/r/a", "/s/b"]) == ["a", "b"]


def test_missing_matplotlib_says_how_to_install(two_runs, tmp_path: Path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(ImportError, match=r"needs matplotlib: pip install matplotlib"):
        plot.main([str(two_runs[0]), "-o", str(tmp_path / "x.png")])
    assert not (tmp_path / "x.png").exists()


# ----------------------------------------------------------------------------- wandb and samples
class FakeRun:
    def __init__(self):
        self.defined: list[tuple[str, str | None]] = []
        self.logged: list[dict] = []
        self.id = "fake"

    def define_metric(self, name: str, step_metric: str | None = None) -> None:
        self.defined.append((name, step_metric))

    def log(self, data: dict) -> None:
        # No `step=` argument: rows are plotted against their own `step` key (eval rows arrive late).
        self.logged.append(data)

    def finish(self) -> None:
        pass


class FakeTable:
    def __init__(self, columns, data):
        self.columns, self.data = columns, data


@pytest.fixture()
def fake_wandb(monkeypatch) -> FakeRun:
    run = FakeRun()
    module = types.SimpleNamespace(init=lambda **kw: run, Settings=lambda **kw: None, Table=FakeTable)
    monkeypatch.setitem(sys.modules, "wandb", module)
    return run


def test_define_sections_plots_every_section_against_step():
    run = FakeRun()
    define_sections(run)
    assert run.defined[0] == ("step", None)
    globs = dict(run.defined[1:])
    for section in ("reward", "perf", "time", "staleness", "moe", "eval", "mismatch", "loss"):
        assert globs[f"{section}/*"] == "step"
    assert globs["*"] == "step" and len(globs) == len(METRIC_SECTIONS) + 1


def _multi_turn_group() -> Group:
    """A two-turn trajectory whose token ids are character codes (decoded by `chr`)."""
    prompt = "<system>" + "You are a careful assistant. " * 20 + "</system><user>What is 2+3?</user>"
    turn1, tool, turn2 = (
        "<assistant>call calculator(2+3)</assistant>",
        "<tool>5</tool>",
        "<assistant>5</assistant>",
    )
    text = prompt + turn1 + tool + turn2
    mask = [0] * len(prompt) + [1] * len(turn1) + [0] * len(tool) + [1] * len(turn2)
    traj = Trajectory(
        task_id="t1",
        token_ids=[ord(c) for c in text],
        loss_mask=mask,
        behavior_logprobs=[-0.1 if m else 0.0 for m in mask],
        versions=[0 if m else -1 for m in mask],
        prompt_len=len(prompt),
        reward=1.0,
        status=Status.COMPLETED,
        turns=2,
    )
    return Group(task=Task(id="t1", prompt="What is 2+3?"), trajectories=[traj])


def decode(ids: list[int]) -> str:
    return "".join(chr(i) for i in ids)


def test_metrics_logger_wandb_sections_and_full_samples(fake_wandb: FakeRun, tmp_path: Path):
    logger = MetricsLogger(str(tmp_path), LoggerConfig(mode="offline", console=False), {}, total_steps=2)
    assert ("reward/*", "step") in fake_wandb.defined and ("*", "step") in fake_wandb.defined
    logger.log({"step": 0, "reward/mean": 0.5})
    group = _multi_turn_group()
    logger.log_samples(0, [group, group], decode)
    logger.close()

    traj = group.trajectories[0]
    full = decode(traj.token_ids)
    (sample,) = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()][:1]
    assert len(sample["prompt"]) > 300 and sample["prompt"].startswith("<system>You are")  # not cut
    # every turn, the tool message included; each assistant turn opened by its policy version
    assert sample["response"].startswith("[v0] ")
    assert sample["prompt"] + re.sub(r"\[v\d+(->v\d+)?\] ", "", sample["response"]) == full
    assert "<tool>5</tool>" in sample["response"]
    assert (sample["reward"], sample["status"], sample["turns"], sample["task"]) == (
        1.0,
        "completed",
        2,
        "t1",
    )

    metrics, tables = fake_wandb.logged
    assert metrics["step"] == tables["step"] == 0 and metrics["reward/mean"] == 0.5
    table = tables["samples"]
    assert table.columns == list(SAMPLE_COLUMNS)
    assert len(table.data) == 2 and table.data[0] == [sample[c] for c in SAMPLE_COLUMNS]


def test_real_offline_wandb_accepts_sections_and_tables(tmp_path: Path):
    logger = MetricsLogger(
        str(tmp_path), LoggerConfig(mode="offline", console=False), {"x": 1}, total_steps=1
    )
    logger.log({"step": 0, "version": 1, "reward/mean": 0.5, "time/step_s": 1.0, "entropy": 2.0})
    logger.log_samples(0, [_multi_turn_group()], decode)
    logger.close()
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
