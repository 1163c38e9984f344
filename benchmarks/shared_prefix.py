"""Trainer step cost with and without `trainer.share_prefix`, on agentic-shaped sequences, in one run.

    python -m benchmarks.shared_prefix                      # SmolLM2-135M, fp32, 16 sequences, 1 thread
    python -m benchmarks.shared_prefix --model-dir DIR --seqs 32 --micro-batch 8 --reps 3

The batch is what `+experiment=calculator` trains on: the calculator env's real first prompt (system
prompt, tool list, one worked example, the question) rendered by the model's chat format, groups of 4
replies of `--reply-tokens` tokens sampled from the vocabulary. One `TrainerRank` (DeepSpeed,
world size 1, lr 0 so both settings see the same weights) runs `train_step` with `share_prefix` off
and on, alternating, `--reps` times each; printed: median step seconds, the ratio, real tokens per
second, and the loss/grad-norm of both (they agree: the same step, computed two ways).
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics

from benchmarks.common import resolve_model_dir, trainer_parser, trainer_worker


def build_groups(model_dir: str, seqs: int, group_size: int, reply_tokens: int, seed: int) -> list:
    from envs.calculator import CalculatorEnv
    from rollout.chat import ChatFormat
    from slime.core.model import load_tokenizer
    from slime.core.types import Group, Trajectory

    tok = load_tokenizer(model_dir)
    chat = ChatFormat(tok)
    rng = random.Random(seed)
    tasks = CalculatorEnv.make_tasks(max(1, seqs // group_size), seed, digits=1, num_ops=1)
    groups = []
    for task in tasks:
        env = CalculatorEnv(demonstrations=1)
        prompt = chat.initial_prompt_ids(asyncio.run(env.reset(task)), env.tools)
        trajs = []
        for _ in range(group_size):
            reply = [rng.randrange(100, tok.vocab_size) for _ in range(reply_tokens)]
            trajs.append(
                Trajectory(
                    task_id=task.id,
                    token_ids=prompt + reply,
                    loss_mask=[0] * len(prompt) + [1] * len(reply),
                    behavior_logprobs=[0.0] * len(prompt) + [-5.0] * len(reply),
                    versions=[-1] * len(prompt) + [0] * len(reply),
                    prompt_len=len(prompt),
                    reward=float(rng.random() < 0.5),
                )
            )
        groups.append(Group(task=task, trajectories=trajs))
    return groups


def main() -> None:
    ap = trainer_parser(__doc__, micro_batch=8, reps=3)
    ap.add_argument("--reply-tokens", type=int, default=64, help="generated tokens per sequence")
    args = ap.parse_args()

    model_dir = resolve_model_dir(args)
    groups = build_groups(model_dir, args.seqs, 4, args.reply_tokens, seed=0)
    prompt_len = groups[0].trajectories[0].prompt_len
    worker = trainer_worker(model_dir, args, lr=0.0)
    worker.setup()
    runs: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    try:
        worker.train_step(groups, version=0)  # warm-up (allocator, DeepSpeed's first step)
        for _ in range(args.reps):
            for share in (False, True):
                worker.forward.share_prefix = share
                runs[share].append(worker.train_step(groups, version=0))
    finally:
        worker.close()
    tokens = runs[False][0]["train/tokens"]
    print(
        f"{args.seqs} sequences of {prompt_len} prompt + {args.reply_tokens} reply tokens, micro-batch "
        f"{args.micro_batch}, {args.threads} thread(s), {os.path.basename(model_dir)}"
    )
    print("share_prefix  step s  tokens/s   loss/policy  grad_norm")
    med = {}
    for share in (False, True):
        med[share] = statistics.median(r["time/train_s"] for r in runs[share])
        last = runs[share][-1]
        print(
            f"{share!s:<12} {med[share]:7.2f} {tokens / med[share]:9.1f} {last['loss/policy']:12.6f} "
            f"{last['grad_norm']:10.4f}"
        )
    print(f"speed-up with share_prefix: {med[False] / med[True]:.2f}x")


if __name__ == "__main__":
    main()
