"""The driver's memory and CPU per batch, with batches moving by reference (what runs) and by value
(what ran before), at 1x and 10x the default batch size.

    python -m benchmarks.driver_load [--steps 20] [--tokens 1024]

The real replay buffer actor holds synthetic groups (batch_groups x group_size trajectories of
`--tokens` tokens, 4 groups x 4 x 1024 tokens at 1x); each step the driver takes a batch from it
(`hand_out`) and hands it to a stand-in trainer actor that reads every token, as trainer ranks do.
By value, the driver fetches the groups itself and passes them on. Printed per mode and size: the
driver's resident memory growth over the steps (peak RSS) and its CPU seconds per step.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import time

from slime.buffer import ReplayBuffer
from slime.core.config import BufferConfig
from slime.core.types import Group, Task, Trajectory


def _group(ticket: int, n: int, tokens: int) -> Group:
    trajs = [
        Trajectory(
            task_id=f"t{ticket}",
            token_ids=list(range(tokens)),
            loss_mask=[0] * 64 + [1] * (tokens - 64),
            behavior_logprobs=[0.0] * 64 + [-0.5] * (tokens - 64),
            versions=[-1] * 64 + [0] * (tokens - 64),
            prompt_len=64,
            reward=float(i % 2),
        )
        for i in range(n)
    ]
    return Group(task=Task(id=f"t{ticket}", prompt="x"), trajectories=trajs, ticket=ticket)


class Producer:
    """Fills the buffer with synthetic groups, in the buffer's own process (as rollout workers put)."""

    def __init__(self, buffer, n: int, tokens: int) -> None:
        self.buffer, self.n, self.tokens = buffer, n, tokens

    async def fill(self, tickets: list[int]) -> None:
        for t in tickets:
            await self.buffer.put.remote(_group(t, self.n, self.tokens))


class Trainer:
    """Reads every token of the batch it is given (references fetched here, as trainer ranks do)."""

    def step(self, groups: list) -> int:
        import ray

        groups = [ray.get(g) if isinstance(g, ray.ObjectRef) else g for g in groups]
        return sum(len(t.token_ids) for g in groups for t in g.trajectories)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(batch_groups: int, group_size: int, tokens: int, steps: int, by_reference: bool) -> dict[str, float]:
    import ray

    from slime.controller import fetch

    buffer = (
        ray.remote(num_cpus=0)(ReplayBuffer)
        .options(max_concurrency=100)
        .remote(
            BufferConfig(max_staleness=steps, max_groups=batch_groups * steps, record=False), batch_groups
        )
    )
    producer = ray.remote(num_cpus=0)(Producer).remote(buffer, group_size, tokens)
    trainer = ray.remote(num_cpus=0)(Trainer).remote()

    async def loop() -> tuple[float, float, int]:
        await producer.fill.remote(list(range(batch_groups * steps)))
        rss0, cpu0, read = _rss_mb(), time.process_time(), 0
        for step in range(steps):
            batch, _ = await buffer.hand_out.remote(batch_groups, step)
            groups = batch.groups if by_reference else fetch(batch.groups)
            read += await trainer.step.remote(groups)
        return _rss_mb() - rss0, (time.process_time() - cpu0) / steps, read

    grew, cpu, read = asyncio.run(loop())
    for a in (buffer, producer, trainer):
        ray.kill(a)
    return {"rss_growth_mb": grew, "cpu_s_per_step": cpu, "tokens_read": float(read)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=1024)
    args = ap.parse_args()
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    print(
        f"{'mode':<13} {'size':>5} {'groups':>7} {'MB/batch':>9} {'driver RSS +MB':>15} {'driver CPU s/step':>18}"
    )
    for by_reference in (True, False):
        for scale in (1, 10):
            b = 4 * scale
            r = run(b, 4, args.tokens, args.steps, by_reference)
            mb = b * 4 * args.tokens * (8 + 4 + 8 + 8) / 2**20  # token, mask, logprob, version per token
            print(
                f"{'reference' if by_reference else 'value':<13} {scale:>4}x {b:>7} {mb:>9.1f} "
                f"{r['rss_growth_mb']:>15.1f} {r['cpu_s_per_step']:>18.4f}"
            )
    ray.shutdown()


if __name__ == "__main__":
    main()
