"""The weight push, end to end: every version the trainer makes reaches every live engine.

    open(engine_nodes)   choose the transport (weights.transport: shm, broadcast or files; auto by Ray
                         node), open trainer rank 0's end (a `WeightSender`) and every worker's end
    publish(version)     the trainer ranks gather the full weights and rank 0 writes them through its
                         sender -> a manifest; deliver it to every live worker (broadcast: rank 0 sends
                         while they receive); each acknowledges with the version it now serves
    rejoin(index)        a restarted worker opens its end again and loads the remembered manifest
    close()              remove the weights dir (/dev/shm is RAM: leave nothing behind)

The transports are strategies (slime/core/transport.py); this module decides when each end opens,
what is delivered to whom, and what happens when an engine misses a version. Trainer rank 0 hosts the
sender (it holds the weights); `TrainerRanks` (trainer/actors.py) and the rank (trainer/rank.py) only
relay these calls to it. Engines load a manifest between decoding steps (rollout/engines/).

Recovery. A worker that dies during a push is skipped by it; one that is up but failed to load it
(its engine died, its broadcast broke) is handed to the fleet to restart (slime/fleet.py); either way
the others' versions never wait on it. A restarted worker calls `rejoin` before it takes work again:
under the push lock, so its load never interleaves with a push, it opens its end (broadcast: a new
group of its own) and loads the remembered manifest, which is always one of the two newest versions
the sender still holds: pushes are serialised, and each replaces it before the trainer publishes the
next.

Replay runs (buffer.replay_path) have no engines and make no `WeightPush`: nothing is published.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, Protocol

from slime.core.config import SlimeConfig, Transport
from slime.core.transport import choose_backend, choose_transport, for_engine
from slime.core.types import WeightChannel, WeightManifest

log = logging.getLogger("slime")


class TrainerEnd(Protocol):
    """Trainer rank 0's end of the push, as `TrainerRanks` relays it."""

    async def node_id(self) -> str | None: ...

    async def open_weights(
        self, transport: str, weights_dir: str, bucket_mb: int, backend: str, timeout_s: float, delta: bool
    ) -> WeightChannel: ...

    async def publish_weights(self, version: int) -> WeightManifest: ...

    async def accept_weights(self, key: str, ranks: int) -> None: ...

    async def send_weights(
        self, manifest: WeightManifest, keys: list[str], delta_keys: list[str]
    ) -> dict[str, str]: ...


class Workers(Protocol):
    """The rollout workers, as `RolloutFleet` (slime/fleet.py) offers them to the push."""

    workers: list[Any]  # Ray actor handles, by index
    restarts: list[int]  # restarts so far, by index
    log_paths: list[str]  # each worker's log file (named in a failure)

    def live(self) -> list[int]: ...

    def mark_live(self, index: int) -> None: ...

    def restart(self, index: int, reason: str, died: bool) -> None: ...


def weights_dir(cfg: SlimeConfig) -> str:
    """Where rank 0 keeps this run's weight slots or files: `weights.dir` (else /dev/shm, else the run
    dir) / slime-weights-<driver pid>."""
    base = cfg.weights.dir or ("/dev/shm" if os.path.isdir("/dev/shm") else cfg.run_dir)
    return os.path.join(base, f"slime-weights-{os.getpid()}")


class WeightPush:
    """Owns the push of new weights from trainer rank 0 to the rollout workers' engines."""

    def __init__(self, cfg: SlimeConfig, trainer: TrainerEnd, fleet: Workers) -> None:
        self.cfg = cfg.weights
        self.bucket_mb = cfg.trainer.weight_bucket_mb
        self.backend = choose_backend(
            cfg.weights.backend, cfg.trainer.gpus_per_rank, cfg.rollout.gpus_per_worker
        )
        self.engine_ranks = cfg.rollout.tensor_parallel_size if cfg.rollout.engine == "vllm" else 1
        self.dir = weights_dir(cfg)
        self.trainer = trainer
        self.fleet = fleet
        self.transport: Transport | None = None
        self.manifest: WeightManifest | None = None  # the latest version, loaded by every rejoining worker
        self.served = [-1] * len(fleet.workers)  # the version each worker acknowledged (-1: none yet)
        self._channel: WeightChannel | None = None
        self._keys = [""] * len(fleet.workers)  # broadcast: each worker's current group
        self._lock = asyncio.Lock()  # one push or rejoin at a time

    # -- open ------------------------------------------------------------------------------------
    async def open(self, engine_nodes: list[str | None]) -> None:
        """Choose the transport from where the engines run and open both ends."""
        trainer_node = await self.trainer.node_id()
        kind = choose_transport(self.cfg.transport, trainer_node, engine_nodes)
        if kind is Transport.files and not self.cfg.dir and any(n != trainer_node for n in engine_nodes):
            raise ValueError(
                "weights.transport=files with rollout workers on other nodes than trainer rank 0: set "
                "weights.dir to a folder on a filesystem every node shares (or use weights.transport=broadcast)"
            )
        self.transport = kind
        self._channel = await self.trainer.open_weights(
            kind.value, self.dir, self.bucket_mb, self.backend, self.cfg.timeout_s, self.cfg.delta
        )
        await asyncio.gather(*(self._connect(i) for i in range(len(self.fleet.workers))))
        log.info(
            "weights: %s transport (%s)", kind, self.backend if kind is Transport.broadcast else self.dir
        )

    async def _connect(self, index: int) -> None:
        """Open worker `index`'s end; broadcast: a group of its own, keyed by its restart count."""
        assert self._channel is not None, "open() first"
        worker = self.fleet.workers[index]
        if self._channel.transport != Transport.broadcast:
            await worker.open_weights.remote(self._channel)
            return
        key = f"worker{index}-start{self.fleet.restarts[index]}"
        await asyncio.gather(
            self.trainer.accept_weights(key, self.engine_ranks),
            worker.open_weights.remote(for_engine(self._channel, key, self.engine_ranks)),
        )
        self._keys[index] = key

    # -- publish and deliver -----------------------------------------------------------------------
    async def publish(self, version: int) -> tuple[float, dict[str, float]]:
        """Publish `version` and load it on every live worker. Returns the push's seconds and its
        figures: time/export_s (gather + write on the trainer), time/engine_load_s (the slowest
        engine's load), sync/bytes."""
        t0 = time.perf_counter()
        async with self._lock:
            manifest = await self.trainer.publish_weights(version)
            export_s = time.perf_counter() - t0
            self.manifest = manifest
            seconds, failed = await self._deliver(manifest, self.fleet.live())
            for index, error in failed.items():
                log.warning(
                    "rollout worker %d did not load version %d: %s (its log: %s)",
                    index,
                    version,
                    error,
                    self.fleet.log_paths[index],
                )
                # A worker that died is restarted by Ray already; one that is up is restarted too.
                self.fleet.restart(index, f"loading weight version {version}: {error}", died=_died(error))
        return time.perf_counter() - t0, {
            "time/export_s": export_s,
            "time/engine_load_s": max(seconds, default=0.0),
            "sync/bytes": float(manifest.num_bytes),
        }

    async def _deliver(
        self, manifest: WeightManifest, indices: list[int]
    ) -> tuple[list[float], dict[int, BaseException]]:
        """Load `manifest` on workers `indices` (broadcast: trainer rank 0 sends while they receive).
        Returns the load seconds of those that acknowledged it and the error of each that did not
        (died meanwhile, or its load or its share of the broadcast failed); one failure never stops
        the others' loads."""
        # One copy of the manifest in Ray's object store, however many workers load it (Ray resolves
        # a reference passed as an argument before the call).
        ref = _by_reference(manifest)
        loads = asyncio.gather(
            *(self.fleet.workers[i].update_weights.remote(ref) for i in indices), return_exceptions=True
        )
        unreached: dict[str, str] = {}
        if manifest.transport == Transport.broadcast:
            # weights.delta: engines that serve the previous version get what changed since it.
            deltas = [self._keys[i] for i in indices if self.served[i] == manifest.version - 1]
            unreached, results = await asyncio.gather(
                self.trainer.send_weights(manifest, [self._keys[i] for i in indices], deltas), loads
            )
        else:
            results = await loads
        seconds: list[float] = []
        failed: dict[int, BaseException] = {}
        for i, result in zip(indices, results, strict=True):
            if isinstance(result, BaseException):
                failed[i] = result
            elif self._keys[i] in unreached:
                failed[i] = RuntimeError(f"weight broadcast failed: {unreached[self._keys[i]]}")
            else:
                self.served[i] = manifest.version
                seconds.append(result)
        return seconds, failed

    # -- recover -----------------------------------------------------------------------------------
    async def rejoin(self, index: int) -> None:
        """Bring restarted worker `index` to the latest version and mark it live (the fleet calls this
        before the worker takes work again). Raises when it cannot load it (one more failure)."""
        async with self._lock:
            self.served[index] = -1  # a fresh engine: nothing to apply a delta to
            await self._connect(index)
            if self.manifest is not None:
                _, failed = await self._deliver(self.manifest, [index])
                if failed:
                    raise failed[index]
            self.fleet.mark_live(index)

    def close(self) -> None:
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


def _by_reference(manifest: WeightManifest) -> Any:
    """The manifest in Ray's object store (itself outside Ray)."""
    import ray

    return ray.put(manifest) if ray.is_initialized() else manifest


def _died(error: BaseException) -> bool:
    from ray.exceptions import RayActorError

    return isinstance(error, RayActorError)
