"""The fleet's push policy (slime/fleet.py `update_weights`), on stand-in workers: pure logic.

A push goes to every live worker at once. One that dies meanwhile is skipped (its supervisor restarts
it and loads the remembered version); one that is up but failed to load, or that the broadcast could
not reach, is killed so its supervisor restarts it, with the load error kept as the reason; the others
load the version either way. The real path (a killed worker in a broadcast run) is
tests/test_transport.py's slow end-to-end test.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from ray.exceptions import ActorDiedError

from slime.core.types import WeightManifest
from slime.fleet import RolloutFleet


class _Method:
    def __init__(self, outcome: Any) -> None:
        self.outcome = outcome

    def remote(self, *args: Any) -> Any:
        async def call() -> Any:
            if isinstance(self.outcome, BaseException):
                raise self.outcome
            return self.outcome

        return call()


class _Worker:
    def __init__(self, load: Any) -> None:
        self.update_weights = _Method(load)


class _Source:
    def __init__(self, unreached: dict[str, str]) -> None:
        self.unreached = unreached
        self.sent: list[list[str]] = []

    async def send_weights(self, manifest: WeightManifest, keys: list[str]) -> dict[str, str]:
        self.sent.append(keys)
        return {k: v for k, v in self.unreached.items() if k in keys}


def _fleet(loads: list[Any], unreached: dict[str, str] | None = None) -> RolloutFleet:
    fleet = RolloutFleet.__new__(RolloutFleet)  # no actors: the policy only
    fleet.workers = [_Worker(load) for load in loads]
    fleet._live = [True] * len(loads)
    fleet._keys = [f"worker{i}-start0" for i in range(len(loads))]
    fleet._source = _Source(unreached or {})
    fleet._manifest = None
    fleet._load_errors = {}
    fleet._push_lock = asyncio.Lock()
    return fleet


def _manifest(transport: str) -> WeightManifest:
    return WeightManifest(version=7, files=[], num_bytes=0, num_tensors=0, transport=transport)


@pytest.fixture
def killed(monkeypatch) -> list[Any]:
    import ray

    out: list[Any] = []
    monkeypatch.setattr(ray, "kill", lambda actor, no_restart=True: out.append((actor, no_restart)))
    return out


@pytest.mark.parametrize("transport", ["shm", "broadcast"])
def test_a_worker_that_dies_during_a_push_is_skipped(transport: str, killed: list[Any]) -> None:
    fleet = _fleet([1.5, ActorDiedError(), 2.5])
    assert asyncio.run(fleet.update_weights(_manifest(transport))) == 2.5
    assert fleet._manifest.version == 7  # remembered: the restarted worker loads it
    assert fleet._live == [True, False, True]
    assert killed == [] and fleet._load_errors == {}  # Ray restarts it already; nothing to kill


def test_a_worker_that_failed_to_load_is_restarted_with_the_reason(killed: list[Any]) -> None:
    fleet = _fleet([RuntimeError("engine core died"), 1.0])
    assert asyncio.run(fleet.update_weights(_manifest("shm"))) == 1.0
    assert killed == [(fleet.workers[0], False)]  # restartable kill
    assert fleet._live == [False, True]
    assert "version 7" in fleet._load_errors[0] and "engine core died" in fleet._load_errors[0]


def test_a_worker_the_broadcast_could_not_reach_is_restarted(killed: list[Any]) -> None:
    fleet = _fleet([1.0, 1.0], unreached={"worker1-start0": "Connection closed by peer"})
    assert asyncio.run(fleet.update_weights(_manifest("broadcast"))) == 1.0
    assert fleet._source.sent == [["worker0-start0", "worker1-start0"]]
    assert killed == [(fleet.workers[1], False)]
    assert "Connection closed by peer" in fleet._load_errors[1]
    assert fleet._live == [True, False]


def test_workers_that_are_not_live_are_not_pushed_to(killed: list[Any]) -> None:
    fleet = _fleet([1.0, ActorDiedError()])
    fleet._live = [True, False]  # restarting: it gets the remembered version when it is back
    assert asyncio.run(fleet.update_weights(_manifest("broadcast"))) == 1.0
    assert fleet._source.sent == [["worker0-start0"]]
