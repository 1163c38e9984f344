"""Cross-stage distillation: does distilling from the previous stage keep its skill while a new task trains?

    python -m benchmarks.cross_stage --out OUT                 # SmolLM2: calculator, then `target`
    python -m benchmarks.cross_stage --out OUT --stage2-steps 30 --eval-tasks 64

Stage 1 trains SmolLM2-135M-Instruct on the calculator task (`+experiment=calculator`, its own 30 steps)
and keeps its final checkpoint. Stage 2 starts from that checkpoint and trains a new task, the `target`
environment (reward: the share of the reply's words made only of lowercase letters), in two arms with
the same steps, seed and samples:

- `rl`: the new task's reward alone;
- `distill`: the same, plus on-policy distillation from the stage-1 checkpoint
  (`algorithm.distill.teacher=STAGE1`, `coef` and `env_coef` 1): the teacher scores the student's
  own tokens on the new task's prompts, and the per-token reverse KL joins the advantage.

Then every checkpoint (stage 1, both stage-2 arms) is evaluated on held-out calculator tasks, greedy:
the skill stage 2 may erase. The evaluation is the step-0 row of a one-step calculator run from that
checkpoint (`eval.every=1`) at a learning rate of 1e-12, so the weights it measures are the
checkpoint's. Results go to `OUT/cross_stage.json` after every run; a run already there is not
repeated (`--fresh` starts over).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

STAGE1 = ["+experiment=calculator", "logger.sample_every=0", "trainer.save_every=0"]
STAGE2 = [*STAGE1, "env=target", "trainer.steps={steps}"]
ARMS: dict[str, list[str]] = {"rl": [], "distill": ["algorithm.distill.teacher={stage1}"]}


def _pretrained(path: str) -> list[str]:
    return ["model.source=pretrained", f"model.path={path}"]


def _final_hf(run_dir: str) -> str:
    ckpts = sorted(os.listdir(os.path.join(run_dir, "checkpoints")))
    return os.path.join(run_dir, "checkpoints", ckpts[-1], "hf")


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _train_summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    train = [r for r in rows if not r.get("eval")]
    rewards = [r["reward/mean"] for r in train]
    k = max(1, len(rewards) // 5)
    out = {"reward_first20": _mean(rewards[:k]), "reward_last20": _mean(rewards[-k:]), "steps": len(train)}
    kl = [r["distill/reverse_kl"] for r in train if "distill/reverse_kl" in r]
    if kl:
        out["reverse_kl_first20"], out["reverse_kl_last20"] = _mean(kl[:k]), _mean(kl[-k:])
    return out


def evaluate(api: Any, ckpt: str, run_dir: str, num_tasks: int) -> dict[str, float]:
    """Held-out calculator figures of `ckpt` (the step-0 evaluation of a run that cannot move it)."""
    api.run(
        [
            *STAGE1,
            *_pretrained(ckpt),
            "trainer.steps=1",
            "trainer.lr=1e-12",
            "trainer.save_final=false",
            "eval.every=1",
            f"eval.num_tasks={num_tasks}",
        ],
        run_dir,
    )
    # Evaluation rows are logged to metrics.jsonl beside the training rows (slime/evaluator.py).
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    first = min((r for r in rows if r.get("eval")), key=lambda r: r["step"])
    return {k: first[k] for k in ("eval/reward_mean", "eval/pass@1", "eval/len_mean", "eval/turns_mean")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--stage2-steps", type=int, default=20)
    p.add_argument("--eval-tasks", type=int, default=64)
    p.add_argument("--fresh", action="store_true", help="ignore results already saved")
    args = p.parse_args()
    from slime import api

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "cross_stage.json")
    saved: dict[str, Any] = {"stage2_steps": args.stage2_steps, "eval_tasks": args.eval_tasks, "runs": {}}
    if os.path.exists(path) and not args.fresh:
        with open(path) as f:
            saved = json.load(f)

    def once(name: str, fn: Any, *fn_args: Any) -> None:
        """Run `fn(*fn_args)` unless `name` is saved; save its result."""
        if name in saved["runs"]:
            return
        t0 = time.perf_counter()
        result = fn(*fn_args)
        result["wall_s"] = time.perf_counter() - t0
        saved["runs"][name] = result
        with open(path, "w") as f:
            json.dump(saved, f, indent=1)
        print(f"{name}: {json.dumps(result)}", flush=True)

    def train(overrides: list[str], run_dir: str) -> dict[str, float]:
        return _train_summary(api.run(overrides, run_dir))

    stage1_dir = os.path.join(args.out, "stage1")
    once("stage1", train, STAGE1, stage1_dir)
    stage1 = _final_hf(stage1_dir)
    once("eval stage1", evaluate, api, stage1, os.path.join(args.out, "eval-stage1"), args.eval_tasks)
    for arm, extra in ARMS.items():
        run_dir = os.path.join(args.out, f"stage2-{arm}")
        overrides = [o.format(steps=args.stage2_steps, stage1=stage1) for o in [*STAGE2, *extra]]
        once(f"stage2 {arm}", train, [*overrides, *_pretrained(stage1)], run_dir)
        eval_dir = os.path.join(args.out, f"eval-{arm}")
        once(f"eval {arm}", lambda d=run_dir, e=eval_dir: evaluate(api, _final_hf(d), e, args.eval_tasks))
    print(json.dumps(saved, indent=1))


if __name__ == "__main__":
    main()
