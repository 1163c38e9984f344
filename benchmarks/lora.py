"""Trainer cost of full fine-tuning vs LoRA (`model.lora.r`), on agentic-shaped batches, in one run.

    python -m benchmarks.lora                         # SmolLM2-135M, fp32, r=16 on the default targets
    python -m benchmarks.lora --model-dir DIR --rank 8 --seqs 32 --reps 3

Two `TrainerRank`s (DeepSpeed ZeRO-1, world size 1) on the same batch (benchmarks/shared_prefix.py's
calculator prompts with random replies): one trains every weight, one only LoRA adapters. Their steps
alternate, `--reps` each after a warm-up step, so a busy machine slows both alike. Printed per setting:
trainable parameters, AdamW state (both moments, bytes), median step seconds and the ratio.
"""

from __future__ import annotations

import os
import statistics

from benchmarks.common import resolve_model_dir, trainer_parser, trainer_worker


def optimizer_state_bytes(policy) -> int:
    """Bytes of AdamW's moments held by the torch optimizer under DeepSpeed's wrappers."""
    import torch

    opt = policy.optimizer
    while not isinstance(opt, torch.optim.Optimizer):
        opt = opt.optimizer
    return sum(
        t.numel() * t.element_size()
        for state in opt.state.values()
        for key, t in state.items()
        if key in ("exp_avg", "exp_avg_sq")
    )


def main() -> None:
    ap = trainer_parser(__doc__, micro_batch=8, reps=3)
    ap.add_argument("--rank", type=int, default=16, help="model.lora.r of the LoRA worker")
    ap.add_argument("--reply-tokens", type=int, default=64, help="generated tokens per sequence")
    args = ap.parse_args()

    from benchmarks.shared_prefix import build_groups

    model_dir = resolve_model_dir(args)
    groups = build_groups(model_dir, args.seqs, 4, args.reply_tokens, seed=0)
    workers = {}
    for label, rank in (("full", 0), (f"lora r={args.rank}", args.rank)):
        workers[label] = trainer_worker(model_dir, args, lr=1e-5, lora_rank=rank)
        workers[label].setup()
    times: dict[str, list[float]] = {label: [] for label in workers}
    try:
        for w in workers.values():
            w.train_step(groups, version=0)  # warm-up; creates the optimizer state
        for _ in range(args.reps):
            for label, w in workers.items():
                times[label].append(w.train_step(groups, version=0)["time/train_s"])
        print(
            f"{args.seqs} sequences, {groups[0].trajectories[0].prompt_len} prompt + {args.reply_tokens} "
            f"reply tokens, micro-batch {args.micro_batch}, {args.threads} thread(s), "
            f"{os.path.basename(model_dir)}, fp32, ZeRO-1"
        )
        print(f"{'setting':<12} {'trainable':>12} {'AdamW state MB':>15} {'step s':>8}  (each step)")
        med = {}
        for label, w in workers.items():
            med[label] = statistics.median(times[label])
            state_mb = optimizer_state_bytes(w.policy) / 2**20
            each = " ".join(f"{t:.2f}" for t in times[label])
            print(f"{label:<12} {w.num_trainable:>12,} {state_mb:>15.2f} {med[label]:>8.2f}  ({each})")
        full, lora = med["full"], med[f"lora r={args.rank}"]
        print(f"LoRA step time / full step time: {lora / full:.2f}")
    finally:
        for w in workers.values():
            w.close()


if __name__ == "__main__":
    main()
