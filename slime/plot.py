"""PNG panels of one or several runs' metrics.jsonl, for a look at a run without a wandb account.

    python -m slime.plot RUN_DIR [RUN_DIR ...] [-o out.png]

Panels (x axis: trainer step): reward (mean with its spread, and evaluation rewards as markers
when the run logged `eval/...reward...` keys), staleness (mean and max), time per step split into
train / weight sync / waiting for a batch, trainer idle fraction, engine-vs-trainer logprob
mismatch, and response length. Each run has one colour, named by its run dir in the legend. A run
without a metric leaves that panel to the others ("no data" when none has it).

Default output: `RUN_DIR/metrics.png` for one run, `runs.png` in the current directory for several.
matplotlib is imported only here (it is in the `dev` extra), with a clear error when missing.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# (title, [(metric key, line style, label suffix)]); line styles tell apart the series of one run.
PANELS: tuple[tuple[str, tuple[tuple[str, str, str], ...]], ...] = (
    ("reward", (("reward/mean", "-", ""),)),
    ("staleness (policy versions)", (("staleness/mean", "-", "mean"), ("staleness/max", ":", "max"))),
    (
        "time per step (s)",
        (("time/train_s", "-", "train"), ("time/sync_s", "--", "sync"), ("time/wait_s", ":", "wait")),
    ),
    ("trainer idle fraction", (("perf/trainer_idle_frac", "-", ""),)),
    ("mismatch |engine - trainer logprob|", (("mismatch/logprob_abs", "-", ""),)),
    ("response length (tokens)", (("response/len_mean", "-", ""),)),
)
# Spans orders of magnitude (1e-7 on the same weights in fp32, 1e-1 and more across versions).
LOG_SCALE = {"mismatch |engine - trainer logprob|"}


@dataclass
class Run:
    """One run's metric rows, in step order."""

    label: str
    rows: list[dict[str, Any]]

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """(steps, values) of the rows that have a finite number under `key`."""
        xs, ys = [], []
        for r in self.rows:
            v = r.get(key)
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and "step" in r:
                xs.append(float(r["step"]))
                ys.append(float(v))
        return xs, ys

    def eval_keys(self) -> list[str]:
        """Evaluation reward keys (`eval/...` naming a reward), in first-seen order."""
        keys: dict[str, None] = {}
        for r in self.rows:
            for k in r:
                if k.startswith("eval/") and "reward" in k and not k.endswith(("/std", "/min", "/max")):
                    keys[k] = None
        return list(keys)


def _metrics_file(path: Path) -> Path:
    return path if path.is_file() else path / "metrics.jsonl"


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The JSON rows of a run dir's metrics.jsonl (or of that file), sorted by step.

    Blank lines and a cut-short last line (a killed run) are skipped. Raises FileNotFoundError
    naming the path when there is no metrics.jsonl.
    """
    file = _metrics_file(Path(path))
    if not file.exists():
        raise FileNotFoundError(f"{path}: no metrics.jsonl (give a run dir or its metrics.jsonl)")
    rows = []
    for line in file.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return sorted(rows, key=lambda r: r.get("step", 0))


def run_labels(paths: list[str | Path]) -> list[str]:
    """Legend names: each run dir's name, or as many trailing path parts as make them distinct."""
    parts = [Path(p).resolve() for p in paths]
    parts = [p.parent if p.is_file() else p for p in parts]
    for depth in range(1, max((len(p.parts) for p in parts), default=1) + 1):
        labels = ["/".join(p.parts[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in parts]


def load_runs(paths: list[str | Path]) -> list[Run]:
    return [Run(label, read_rows(p)) for label, p in zip(run_labels(paths), paths, strict=True)]


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(
            "python -m slime.plot needs matplotlib: pip install matplotlib (it is in slime's dev extra: "
            "pip install -e '.[dev]')"
        ) from e
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_runs(runs: list[Run], out: str | Path) -> Any:
    """Draw the panels for `runs` into the PNG `out`; returns the matplotlib Figure (closed)."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    ncols = 3
    nrows = math.ceil(len(PANELS) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 4 * nrows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, series) in zip(axes.flat, PANELS, strict=False):
        drawn = False
        for i, run in enumerate(runs):
            colour = colours[i % len(colours)]
            for key, style, suffix in series:
                xs, ys = run.series(key)
                if not xs:
                    continue
                label = f"{run.label} {suffix}" if len(series) > 1 else run.label
                ax.plot(xs, ys, style, color=colour, label=label, marker="." if len(xs) < 30 else None)
                drawn = True
                if key == "reward/mean":  # the spread as a band
                    std = dict(zip(*run.series("reward/std"), strict=True))
                    low = [y - std.get(x, 0.0) for x, y in zip(xs, ys, strict=True)]
                    high = [y + std.get(x, 0.0) for x, y in zip(xs, ys, strict=True)]
                    ax.fill_between(xs, low, high, color=colour, alpha=0.15, lw=0)
            if title == "reward":
                for key in run.eval_keys():
                    xs, ys = run.series(key)
                    if xs:
                        ax.plot(
                            xs, ys, "D", color=colour, markeredgecolor="black", label=f"{run.label} {key}"
                        )
                        drawn = True
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if title in LOG_SCALE and drawn and all(y > 0 for line in ax.get_lines() for y in line.get_ydata()):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
    for ax in list(axes.flat)[len(PANELS) :]:
        ax.set_visible(False)
    fig.suptitle(", ".join(r.label for r in runs), fontsize="medium")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return fig


def main(argv: list[str] | None = None) -> Path:
    """The command line (see the module docstring); returns the PNG's path."""
    parser = argparse.ArgumentParser(prog="python -m slime.plot", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="run dirs (or their metrics.jsonl files)")
    parser.add_argument("-o", "--out", help="PNG to write (default: RUN_DIR/metrics.png, or runs.png)")
    args = parser.parse_args(argv)
    runs = load_runs(args.runs)
    if args.out:
        out = Path(args.out)
    elif len(args.runs) == 1:
        out = _metrics_file(Path(args.runs[0])).parent / "metrics.png"
    else:
        out = Path("runs.png")
    plot_runs(runs, out)
    print(f"wrote {out} ({', '.join(f'{r.label}: {len(r.rows)} steps' for r in runs)})")
    return out


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ImportError) as e:
        sys.exit(f"slime.plot: {e}")
