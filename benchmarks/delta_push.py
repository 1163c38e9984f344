"""Delta weight pushes (weights.delta) against full pushes: bytes on the wire and seconds, after one
optimizer step of full fine-tuning and after one step of LoRA, on SmolLM2-135M.

    python -m benchmarks.delta_push [--threads 2] [--lr 1e-5]

A trainer rank (in this process) publishes version 1, sends it in full to a receiver (an engine's
end of the broadcast group, in a thread), trains one step, publishes version 2 and sends it twice to
that receiver's group: once in full, once as a delta against version 1. The receiver applies the delta
and checks every bucket against the sender's checksums. Bytes are the flat buffer's (full) and the
compressed changed buckets' (delta); seconds are the sender's `send` (delta: XOR + compression +
broadcast) and the receiver's `receive` (delta: decompression + XOR + checksums), running together:
the push takes the longer of the two.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile

from benchmarks.common import resolve_model_dir, trainer_parser, trainer_worker


async def _push(sender, receiver, manifest, delta: bool) -> dict[str, float]:
    sent, _ = await asyncio.gather(
        asyncio.to_thread(sender.send, manifest, ["bench"], ["bench"] if delta else []),
        asyncio.to_thread(receiver.receive, manifest),
    )
    if sent:
        raise RuntimeError(f"broadcast failed: {sent}")
    return {
        "bytes": sender.last_send["delta_bytes" if delta else "full_bytes"],
        "send_s": sender.last_send["seconds"],
        "receive_s": receiver.last_receive["seconds"],
    }


def _groups(tokenizer, n: int = 4, length: int = 64) -> list:
    """Four groups of four replies with rewards that vary (so the step moves the weights)."""
    import random

    from slime.core.types import Group, Task, Trajectory

    rng = random.Random(0)
    out = []
    for g in range(n):
        prompt = tokenizer.encode(f"Question {g}: write a short story about the sea.")
        trajs = []
        for i in range(4):
            reply = [rng.randrange(100, 20000) for _ in range(length)]
            trajs.append(
                Trajectory(
                    task_id=str(g),
                    token_ids=prompt + reply,
                    loss_mask=[0] * len(prompt) + [1] * length,
                    behavior_logprobs=[0.0] * len(prompt) + [-5.0] * length,
                    versions=[-1] * len(prompt) + [0] * length,
                    prompt_len=len(prompt),
                    reward=float(i % 2),
                )
            )
        out.append(Group(task=Task(id=str(g), prompt="x"), trajectories=trajs))
    return out


async def run(args: argparse.Namespace, lora: bool) -> dict[str, dict[str, float]]:
    from slime.core.model import load_tokenizer
    from slime.core.transport import for_engine
    from slime.core.transport_broadcast import BroadcastReceiver

    model_dir = resolve_model_dir(args)
    w = trainer_worker(model_dir, args, lr=args.lr, lora_rank=16 if lora else 0)
    w.setup()
    work = tempfile.mkdtemp(prefix="slime-delta-")
    try:
        channel = w.open_weights("broadcast", os.path.join(work, "w"), 64, "gloo", 600, True)
        channel = for_engine(channel, "bench", 1)
        _, receiver = await asyncio.gather(
            asyncio.to_thread(w.accept_weights, "bench", 1), asyncio.to_thread(BroadcastReceiver, channel, 1)
        )
        sender = w.weight_sender
        await _push(sender, receiver, w.publish_weights(1), delta=False)  # the engine holds version 1
        w.train_step(_groups(load_tokenizer(model_dir)), version=1)
        second = w.publish_weights(2)
        delta = await _push(sender, receiver, second, delta=True)  # 1 -> 2, checked by checksum
        full = await _push(sender, receiver, second, delta=False)  # the same version, every byte
        return {"delta": delta, "full": full, "trainable": {"params": float(w.num_trainable)}}
    finally:
        w.close()


def main() -> None:
    ap = trainer_parser(__doc__, micro_batch=8, reps=1)
    ap.add_argument("--lr", type=float, default=1e-5)
    args = ap.parse_args()
    print(
        f"{'after one step of':<22} {'full MB':>8} {'delta MB':>9} {'ratio':>6} {'full s':>7} {'delta s':>8}"
    )
    for lora in (False, True):
        r = asyncio.run(run(args, lora))
        f, d = r["full"], r["delta"]
        print(
            f"{'LoRA r=16' if lora else 'full fine-tuning':<22} {f['bytes'] / 2**20:>8.1f} {d['bytes'] / 2**20:>9.1f} "
            f"{d['bytes'] / f['bytes']:>6.1%} {max(f['send_s'], f['receive_s']):>7.2f} {max(d['send_s'], d['receive_s']):>8.2f}"
        )


if __name__ == "__main__":
    main()
