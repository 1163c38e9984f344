"""The weight push's delivery policy (slime/weight_push.py), on stand-in workers and a stand-in
trainer: pure logic.

A push goes to every live worker at once. One that dies meanwhile is skipped (Ray restarts it and its
supervisor rejoins it at the remembered version); one that is up but failed to load, or that the
broadcast could not reach, is handed to the fleet to restart, with the load error kept as the
reason; the others load the version either way and acknowledge it. A rejoining worker loads the
remembered manifest before it is live again. The real paths (a killed worker in a broadcast run, the
push in every end-to-end run) are tests/test_transport.py's and tests/test_e2e.py's.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from ray.exceptions import ActorDiedError

from slime.core.config import SlimeConfig
from slime.core.types import WeightChannel, WeightManifest
from slime.weight_push import WeightPush


class _Method:
    def __init__(self, outcome: Any) -> None:
        self.outcome = outcome
        self.calls: list[tuple] = []

    def remote(self, *args: Any) -> Any:
        self.calls.append(args)

        async def call() -> Any:
            if isinstance(self.outcome, BaseException):
                raise self.outcome
            return self.outcome

        return call()


class _Worker:
    def __init__(self, load: Any) -> None:
        self.update_weights = _Method(load)
        self.open_weights = _Method(None)


class _Fleet:
    def __init__(self, loads: list[Any]) -> None:
        self.workers = [_Worker(load) for load in loads]
        self.restarts = [0] * len(loads)
        self.log_paths = [f"/logs/rollout-worker{i}.log" for i in range(len(loads))]
        self.is_live = [True] * len(loads)
        self.restarted: list[tuple[int, str, bool]] = []

    def live(self) -> list[int]:
        return [i for i, ok in enumerate(self.is_live) if ok]

    def mark_live(self, index: int) -> None:
        self.is_live[index] = True

    def restart(self, index: int, reason: str, died: bool) -> None:
        self.is_live[index] = False
        self.restarted.append((index, reason, died))


class _Trainer:
    def __init__(self, transport: str, unreached: dict[str, str] | None = None) -> None:
        self.transport = transport
        self.unreached = unreached or {}
        self.sent: list[list[str]] = []
        self.deltas: list[list[str]] = []
        self.accepted: list[str] = []

    async def node_id(self) -> str | None:
        return "node-a"

    async def open_weights(self, transport: str, *_: Any) -> WeightChannel:
        return WeightChannel(transport=transport)

    async def publish_weights(self, version: int) -> WeightManifest:
        return WeightManifest(version=version, transport=self.transport, num_bytes=10, num_tensors=1)

    async def accept_weights(self, key: str, ranks: int) -> None:
        self.accepted.append(key)

    async def send_weights(
        self, manifest: WeightManifest, keys: list[str], delta_keys: list[str]
    ) -> dict[str, str]:
        self.sent.append(keys)
        self.deltas.append(delta_keys)
        return {k: v for k, v in self.unreached.items() if k in keys}


def _push(transport: str, loads: list[Any], unreached: dict[str, str] | None = None) -> WeightPush:
    cfg = SlimeConfig.__new__(SlimeConfig)  # only the sections the push reads
    from slime.core.config import RolloutConfig, TrainerConfig, WeightsConfig

    cfg.weights, cfg.trainer, cfg.rollout, cfg.run_dir = (
        WeightsConfig(transport=transport),
        TrainerConfig(),
        RolloutConfig(),
        ".",
    )
    fleet = _Fleet(loads)
    push = WeightPush(cfg, _Trainer(transport, unreached), fleet)
    asyncio.run(push.open(["node-a"] * len(loads)))
    return push


@pytest.mark.parametrize("transport", ["shm", "broadcast"])
def test_a_worker_that_dies_during_a_push_is_skipped(transport: str) -> None:
    push = _push(transport, [1.5, ActorDiedError(), 2.5])
    seconds, info = asyncio.run(push.publish(7))
    assert info["time/engine_load_s"] == 2.5 and info["sync/bytes"] == 10.0
    assert push.manifest.version == 7  # remembered: the restarted worker loads it
    assert push.served == [7, -1, 7]  # acknowledged by the two that loaded it
    ((index, reason, died),) = push.fleet.restarted
    assert index == 1 and died  # Ray restarts it already: the fleet only takes it out of service


def test_a_worker_that_failed_to_load_is_restarted_with_the_reason() -> None:
    push = _push("shm", [RuntimeError("engine core died"), 1.0])
    asyncio.run(push.publish(7))
    ((index, reason, died),) = push.fleet.restarted
    assert index == 0 and not died
    assert "version 7" in reason and "engine core died" in reason
    assert push.fleet.is_live == [False, True]


def test_a_worker_the_broadcast_could_not_reach_is_restarted() -> None:
    push = _push("broadcast", [1.0, 1.0], unreached={"worker1-start0": "Connection closed by peer"})
    asyncio.run(push.publish(7))
    assert push.trainer.sent == [["worker0-start0", "worker1-start0"]]
    ((index, reason, died),) = push.fleet.restarted
    assert index == 1 and not died and "Connection closed by peer" in reason
    assert push.served == [7, -1]


def test_workers_that_are_not_live_are_not_pushed_to() -> None:
    push = _push("broadcast", [1.0, 1.0])
    push.fleet.is_live = [True, False]  # restarting: it gets the remembered version when it rejoins
    asyncio.run(push.publish(7))
    assert push.trainer.sent == [["worker0-start0"]]
    assert push.fleet.workers[1].update_weights.calls == []


def test_a_rejoining_worker_opens_a_new_group_and_loads_the_remembered_version() -> None:
    push = _push("broadcast", [1.0, 1.0])
    asyncio.run(push.publish(7))
    push.fleet.is_live[1] = False
    push.fleet.restarts[1] = 1  # its supervisor counted the failure
    asyncio.run(push.rejoin(1))
    assert push.trainer.accepted[-1] == "worker1-start1"  # a group of its own
    assert push.trainer.sent[-1] == ["worker1-start1"]  # the remembered version, to it alone
    assert push.fleet.is_live[1] and push.served == [7, 7]


def test_a_rejoin_that_cannot_load_raises_and_stays_out_of_service() -> None:
    push = _push("shm", [1.0, 1.0])
    asyncio.run(push.publish(7))
    push.fleet.is_live[1] = False
    push.fleet.workers[1].update_weights.outcome = RuntimeError("still broken")
    with pytest.raises(RuntimeError, match="still broken"):
        asyncio.run(push.rejoin(1))
    assert not push.fleet.is_live[1]


def test_files_to_other_nodes_need_a_shared_weights_dir() -> None:
    cfg = SlimeConfig.__new__(SlimeConfig)
    from slime.core.config import RolloutConfig, TrainerConfig, WeightsConfig

    cfg.weights, cfg.trainer, cfg.rollout, cfg.run_dir = (
        WeightsConfig(transport="files"),
        TrainerConfig(),
        RolloutConfig(),
        ".",
    )
    push = WeightPush(cfg, _Trainer("files"), _Fleet([1.0]))
    with pytest.raises(ValueError, match="weights.dir"):
        asyncio.run(push.open(["node-b"]))


def test_deltas_go_to_engines_that_serve_the_previous_version_and_never_to_a_rejoining_one() -> None:
    push = _push("broadcast", [1.0, 1.0])
    asyncio.run(push.publish(1))
    assert push.trainer.deltas[-1] == []  # version 0 was never published: full pushes
    asyncio.run(push.publish(2))
    assert push.trainer.deltas[-1] == ["worker0-start0", "worker1-start0"]
    push.fleet.is_live[1] = False
    push.fleet.restarts[1] = 1
    asyncio.run(push.rejoin(1))  # a fresh engine holds nothing to apply a delta to
    assert push.trainer.sent[-1] == ["worker1-start1"] and push.trainer.deltas[-1] == []
    asyncio.run(push.publish(3))
    assert push.trainer.deltas[-1] == ["worker0-start0", "worker1-start1"]
