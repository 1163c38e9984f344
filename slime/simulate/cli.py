"""A scheduling simulator of slime's loop, calibrated from a run dir: what step time, trainer idle and
staleness would another shape give (more engines, another staleness bound, slower tools)?

    python -m slime.simulate RUN_DIR                          # calibrate, then simulate the run's own shape
    python -m slime.simulate RUN_DIR --set num_workers=4 --set max_staleness=2
    python -m slime.simulate RUN_DIR --sweep num_workers=1,2,4,8 --sweep max_staleness=0,1
    python -m slime.simulate RUN_DIR --compare OTHER_RUN ...  # predict other runs' shapes, against their metrics
    python -m slime.simulate --set seq_tok_s=40 --set ...     # no run dir: every parameter from --set

The model is slime/simulate/model.py, its calibration from a run dir slime/simulate/calibration.py;
docs/scaling.md has the validation against measured runs and a sizing study.
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Sequence
from typing import Any

from slime.simulate.calibration import calibrate, measured_summary, pack_run, read_run, retarget
from slime.simulate.model import predict
from slime.simulate.params import SETTABLE, Params, parse_setting

COLUMNS = (
    ("step_s", "step s", ".3f"),
    ("trainer_idle_frac", "idle", ".0%"),
    ("wait_s", "wait s", ".3f"),
    ("train_s", "train s", ".3f"),
    ("staleness_mean", "stale mean", ".2f"),
    ("staleness_max", "stale max", ".0f"),
    ("gen_tok_s", "gen tok/s", ".1f"),
    ("samples_s", "samples/s", ".2f"),
)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def _figures(summary: dict[str, float]) -> list[str]:
    return [format(summary[k], spec) for k, _, spec in COLUMNS]


def describe(params: Params) -> str:
    """The parameters, one line each (the recorded episodes counted, not listed)."""
    out = []
    for name in SETTABLE:
        value = getattr(params, name)
        out.append(f"  {name:<22} {value:.6g}" if isinstance(value, float) else f"  {name:<22} {value}")
    if params.recorded:
        n = sum(len(g) for g in params.recorded)
        out.append(f"  {'recorded':<22} {len(params.recorded)} groups, {n} episodes")
    return "\n".join(out)


def _sweep_grid(sweeps: list[str]) -> list[dict[str, Any]]:
    axes = []
    for text in sweeps:
        key, sep, values = text.partition("=")
        if not sep:
            raise SystemExit(f"--sweep {text!r}: expected key=v1,v2,...")
        axes.append([parse_setting(f"{key}={v}") for v in values.split(",")])
    return [dict(combo) for combo in itertools.product(*axes)]


def compare_runs(
    reference: str, others: Sequence[str], base: Params, holdout: bool = False
) -> list[dict[str, Any]]:
    """Each run predicted two ways against its measured figures (steps after the first): from its
    own calibration (with `holdout`, fitted on its odd steps and compared on its even ones) and from
    `reference`'s calibration on its shape and workload."""
    ref_params, _ = calibrate(reference, base=base)
    out = []
    for path in others:
        run = read_run(path)
        steps = [int(r["step"]) for r in run.rows[1:]]
        fit = [s for s in steps if s % 2] if holdout else steps
        check = [s for s in steps if not s % 2] if holdout else steps
        own, _ = calibrate(run, fit, base)
        measured = measured_summary(run, check)
        out.append(
            {
                "run": path,
                "measured": measured,
                "own": predict(own),
                "from_reference": predict(retarget(ref_params, run, steps)),
            }
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:

    ap = argparse.ArgumentParser(
        prog="python -m slime.simulate",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "run_dir", nargs="?", help="a run dir to calibrate from (config.yaml, metrics.jsonl, buffer/)"
    )
    ap.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...")
    ap.add_argument(
        "--compare", nargs="+", default=[], metavar="RUN_DIR", help="runs to predict from RUN_DIR's fit"
    )
    ap.add_argument("--holdout", action="store_true", help="fit on odd steps, compare on even ones")
    ap.add_argument("--json", action="store_true", help="print JSON instead of tables")
    ap.add_argument("--params", action="store_true", help="print the parameters used")
    ap.add_argument(
        "--pack", metavar="FILE.json", help="write RUN_DIR as one small JSON file others can read"
    )
    args = ap.parse_args(argv)
    settings = dict(parse_setting(s) for s in args.settings)
    prior = {k: v for k, v in settings.items() if k in ("b_sat", "seed", "warmup")}
    base = Params(**prior)
    measured: dict[str, float] | None = None
    if args.run_dir:
        run = read_run(args.run_dir)
        if args.pack:
            with open(args.pack, "w", encoding="utf-8") as f:
                json.dump(pack_run(run), f)
            print(f"wrote {args.pack}")
            return 0
        steps = [int(r["step"]) for r in run.rows[1:]]
        fit = [s for s in steps if s % 2] if args.holdout else steps
        params, notes = calibrate(run, fit, base)
        measured = measured_summary(run, [s for s in steps if not s % 2] if args.holdout else steps)
        if not args.json:
            print(
                f"calibrated from {args.run_dir}, steps {notes['steps'][0]}-{notes['steps'][-1]}"
                f"{' (odd)' if args.holdout else ''}, {notes['episodes']} recorded episodes"
            )
    else:
        params = base
    params = params.with_(**settings)
    if args.params and not args.json:
        print(describe(params))
    if args.compare:
        if not args.run_dir:
            raise SystemExit("--compare needs a RUN_DIR to calibrate from")
        results = compare_runs(args.run_dir, args.compare, base, args.holdout)
        if args.json:
            print(json.dumps(results, indent=1))
            return 0
        rows = []
        for r in results:
            m, own, ref = r["measured"]["step_s"], r["own"]["step_s"], r["from_reference"]["step_s"]
            rows.append(
                [
                    r["run"],
                    f"{m:.3f}",
                    f"{own:.3f}",
                    f"{own / m - 1:+.0%}",
                    f"{ref:.3f}",
                    f"{ref / m - 1:+.0%}",
                ]
            )
        print(_table(["run", "measured step s", "own fit", "error", "from RUN_DIR", "error"], rows))
        return 0
    grid = _sweep_grid(args.sweep) if args.sweep else []
    if grid:
        results = [(combo, predict(params.with_(**combo))) for combo in grid]
        if args.json:
            print(json.dumps([{**{k: str(v) for k, v in c.items()}, **s} for c, s in results], indent=1))
            return 0
        keys = list(grid[0])
        print(
            _table(
                keys + [h for _, h, _ in COLUMNS],
                [[str(c[k]) for k in keys] + _figures(s) for c, s in results],
            )
        )
        return 0
    predicted = predict(params)
    if args.json:
        print(json.dumps({"predicted": predicted, "measured": measured}, indent=1))
        return 0
    rows = [["predicted", *_figures(predicted)]]
    if measured is not None and not settings:
        rows.insert(0, ["measured", *_figures(measured)])
    elif measured is not None:
        rows.insert(0, ["measured (run's own shape)", *_figures(measured)])
    print(_table(["", *[h for _, h, _ in COLUMNS]], rows))
    return 0
