"""The trainer as Ray actors: one `TrainerRank` per data-parallel rank.

The controller talks only to `TrainerRanks`. Every method fans out to all ranks (they run
collectives together) and awaits them; the first rank to fail fails the call with its rank in the
message (the others may be stuck in a collective then: call `shutdown()`; the ranks are not
reusable after a failure).

Groups of trajectories are sharded here (`trainer.batching.shard_tokens`: whole groups, equal
counts, balanced tokens); metrics come back from rank 0 and are already reduced over all ranks.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from slime.core.logs import log_file
from slime.core.types import Batch, Group, WeightChannel, WeightManifest
from trainer.batching import shard_tokens
from trainer.process import rank_env
from trainer.rank import TrainerSpec

log = logging.getLogger(__name__)


class TrainerRanks:
    """`spec.trainer.num_ranks` trainer actors in one process group, all built from `spec`.

    Construction creates the actors (cheap); `await setup()` joins the process group and builds the
    DeepSpeed models. Each actor gets its thread budget and accelerator through its `runtime_env`.
    """

    def __init__(self, spec: TrainerSpec, run_dir: str = "") -> None:
        """With `run_dir`, rank R writes its output (DeepSpeed's, transformers') to
        `<run_dir>/logs/trainer-rankR.log` (slime/core/logs.py), and a failure names that file."""
        import ray

        from trainer.rank import TrainerRank

        cfg = spec.trainer
        self.num_ranks = cfg.num_ranks
        self.log_paths = [
            log_file(run_dir, f"trainer-rank{r}") if run_dir else "" for r in range(cfg.num_ranks)
        ]
        actor_cls = ray.remote(TrainerRank)
        self.actors = [
            actor_cls.options(
                num_cpus=cfg.num_cpus_per_rank,
                num_gpus=cfg.gpus_per_rank,
                runtime_env={"env_vars": rank_env(cfg, rank)},
            ).remote(spec, rank, self.num_ranks, log_path=self.log_paths[rank])
            for rank in range(self.num_ranks)
        ]

    async def _all(self, method: str, per_rank_args: list[tuple] | None = None) -> list[Any]:
        """Call `method` on every rank, return the results in rank order; the first failure raises
        RuntimeError("trainer rank R failed in METHOD: ...")."""
        args = per_rank_args or [()] * self.num_ranks
        futures = {
            asyncio.ensure_future(self._one(rank, method, getattr(actor, method).remote(*a))): rank
            for rank, (actor, a) in enumerate(zip(self.actors, args, strict=True))
        }
        done, pending = await asyncio.wait(futures, return_when=asyncio.FIRST_EXCEPTION)
        for fut in done:
            if fut.exception() is not None:
                for p in pending:
                    p.cancel()
                raise fut.exception()
        return [fut.result() for fut in sorted(futures, key=futures.__getitem__)]

    async def _one(self, rank: int, method: str, ref: Any) -> Any:
        try:
            return await ref
        except Exception as e:
            where = f" (its log: {self.log_paths[rank]})" if self.log_paths[rank] else ""
            raise RuntimeError(f"trainer rank {rank} failed in {method}{where}: {e}") from e

    async def setup(self) -> list[dict[str, Any]]:
        """Rendezvous at rank 0's node on a free port, then build the models on every rank."""
        addr, port = await self._one(0, "node_address", self.actors[0].node_address.remote())
        info = await self._all("setup", [(addr, port)] * self.num_ranks)
        log.info("trainer ready: %d rank(s) at %s:%d, %s", self.num_ranks, addr, port, info[0])
        return info

    async def train_step(self, batch: Batch | list[Group], version: int) -> dict[str, float]:
        """Shard `batch` over the ranks (whole groups, by its token counts), train one step, return
        the global metrics. The groups go to the ranks as the batch holds them: Ray references that
        each rank resolves itself, so they never pass through this process."""
        if not isinstance(batch, Batch):
            batch = Batch.of(batch)  # groups themselves (in-process callers, tests)
        if len(batch) < self.num_ranks:
            raise ValueError(f"train_step got {len(batch)} groups for {self.num_ranks} trainer ranks")
        shards = shard_tokens(batch.tokens, self.num_ranks)
        results = await self._all("train_step", [([batch.groups[i] for i in s], version) for s in shards])
        return results[0]

    # -- the trainer end of the weight push (slime/weight_push.py); rank 0 hosts the sender ----------
    async def publish_weights(self, version: int) -> WeightManifest:
        """Publish the full weights as `version` through rank 0's transport (all ranks gather)."""
        results = await self._all("publish_weights", [(version,)] * self.num_ranks)
        manifest = results[0]
        if manifest is None:
            raise RuntimeError("trainer rank 0 returned no weight manifest")
        return manifest

    async def node_id(self) -> str | None:
        """Rank 0's Ray node id: the node weights.transport=auto compares the engines' with."""
        return await self._one(0, "node_id", self.actors[0].node_id.remote())

    async def open_weights(
        self,
        transport: str,
        weights_dir: str,
        bucket_mb: int,
        backend: str,
        timeout_s: float,
        delta: bool = False,
    ) -> WeightChannel:
        """Open rank 0's end of the weight transport; `publish_weights` then publishes through it."""
        ref = self.actors[0].open_weights.remote(transport, weights_dir, bucket_mb, backend, timeout_s, delta)
        return await self._one(0, "open_weights", ref)

    async def accept_weights(self, key: str, ranks: int) -> None:
        """Link one engine's group to rank 0 (the engine joins at the same time)."""
        await self._one(0, "accept_weights", self.actors[0].accept_weights.remote(key, ranks))

    async def send_weights(
        self, manifest: WeightManifest, keys: list[str], delta_keys: list[str] | None = None
    ) -> dict[str, str]:
        """Broadcast a published version to the engines `keys` (they receive at the same time);
        returns the engines it could not reach, key -> error."""
        ref = self.actors[0].send_weights.remote(manifest, keys, delta_keys)
        return await self._one(0, "send_weights", ref)

    async def save_checkpoint(self, ckpt_dir: str, step: int, version: int) -> str:
        """DeepSpeed state of every rank plus the transformers export; returns ckpt_dir."""
        results = await self._all("save_checkpoint", [(ckpt_dir, step, version)] * self.num_ranks)
        return results[0]

    async def load_checkpoint(self, ckpt_dir: str) -> tuple[int, int]:
        """Resume every rank from a checkpoint (or the latest under a directory); returns (step, version)."""
        results = await self._all("load_checkpoint", [(ckpt_dir,)] * self.num_ranks)
        return results[0]

    def shutdown(self) -> None:
        """Kill the rank actors (their process group goes with them). Safe to call twice."""
        import ray

        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception as e:  # an actor that is already gone
                log.debug("killing a trainer actor: %s", e)
        self.actors = []
