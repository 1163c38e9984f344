"""Weight transports (slime/core/transport.py): shm slots and broadcast groups, end to end on real parts.

- The auto choice and the backend choice (pure functions).
- Slots: a version round-trips bit-exactly through a slot and through a gloo broadcast; versions
  alternate between the two slots, so the previous one stays readable. An engine whose process dies
  with its group open is reported by `send`, and the other engine still gets the whole version.
- The key test: a real DeepSpeed trainer (in-process) pushes to the session's vLLM engine with
  weights.transport=broadcast, the engine opened with a weights dir of its OWN and the trainer's dir
  deleted before the send, so no file can carry the weights; the engine's logprobs then equal the
  trainer's. The same engine told to use shm with that dir fails (the control: the test can tell).
- MoE (per-expert checkpoint names, the CPU expert repack) on a vLLM engine and the transformers
  engine, each with both transports.
- A real run with weights.transport=broadcast whose rollout worker is killed: the restarted engine
  joins a group of its own and gets the current version again.

Logprob comparisons pin float32 (this CPU would resolve `auto` to bf16); tolerances as in
tests/test_engine.py and tests/test_trainer.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch
from conftest import algo_cfg, make_groups, new_worker, restore_weights, token_logprobs, trainer_cfg
from test_engine import perturbed

from slime.core.checkpoint import checkpoint_tensors
from slime.core.config import Transport
from slime.core.transport import choose_backend, choose_transport, for_engine, open_receiver
from slime.core.transport_broadcast import BroadcastSender
from slime.core.transport_shm import ShmReceiver, ShmSender
from slime.core.types import SamplingParams

TOL_MEAN = 1e-4
TOL_MAX = 1e-3


# --------------------------------------------------------------------------------------------------
# The choices
# --------------------------------------------------------------------------------------------------


def test_auto_is_shm_only_when_every_engine_is_on_the_trainers_node() -> None:
    assert choose_transport("auto", "n0", ["n0", "n0"]) is Transport.shm
    assert choose_transport("auto", "n0", ["n0", "n1"]) is Transport.broadcast
    assert choose_transport("auto", None, [None]) is Transport.shm  # outside Ray: one machine
    assert choose_transport("auto", "n0", []) is Transport.shm
    assert choose_transport("broadcast", "n0", ["n0"]) is Transport.broadcast
    assert choose_transport("shm", "n0", ["n0"]) is Transport.shm
    with pytest.raises(ValueError, match=r"weights.transport=shm: rollout workers \[1\]"):
        choose_transport("shm", "n0", ["n0", "n1"])


def test_backend_choice() -> None:
    assert choose_backend("auto", 0, 0) == "gloo"
    assert choose_backend("auto", 1, 0) == "gloo"  # a CPU end cannot take part in NCCL
    assert choose_backend("auto", 1, 0.5) == "nccl"
    assert choose_backend("gloo", 1, 1) == "gloo"


def test_nccl_without_gpus_is_rejected_before_start() -> None:
    from slime import api
    from slime.core.validation import validate

    cfg = api.compose_config(["+experiment=tiny", "weights.backend=nccl"], ".")
    with pytest.raises(ValueError, match="weights.backend=nccl needs GPUs"):
        validate(cfg)


# --------------------------------------------------------------------------------------------------
# Slots and groups, without an engine
# --------------------------------------------------------------------------------------------------


def _version(offset: float) -> list[tuple[str, torch.Tensor]]:
    """Tensors of every shape class a model has: matrices, bf16, a scalar, an empty tensor."""
    gen = torch.Generator().manual_seed(0)
    return [
        ("model.layers.0.mlp.experts.0.gate_proj.weight", torch.randn(5, 3, generator=gen) + offset),
        ("model.norm.weight", (torch.randn(7, generator=gen) + offset).to(torch.bfloat16)),
        ("scale", torch.tensor(2.5 + offset)),
        ("empty", torch.empty(0, 4)),
    ]


def test_slots_alternate_and_round_trip_exactly(tmp_path: Path) -> None:
    sender = ShmSender(str(tmp_path / "trainer"), timeout_s=30)
    try:
        m1 = sender.publish(iter(_version(0.0)), version=1)
        m2 = sender.publish(iter(_version(1.0)), version=2)
        assert m1.slot != m2.slot and not m1.files and m1.num_tensors == 4
        assert m1.num_bytes == 15 * 4 + 7 * 2 + 4  # tensor bytes, alignment padding not counted
        receiver = ShmReceiver(str(tmp_path / "trainer"))
        for manifest, offset in ((m1, 0.0), (m2, 1.0)):  # v1 is still intact after v2 was written
            got = dict(receiver.receive(manifest))
            for name, t in _version(offset):
                assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
        # A third version goes back into v1's slot.
        m3 = sender.publish(iter(_version(2.0)), version=3)
        assert m3.slot == m1.slot
        with pytest.raises(ValueError, match="weights changed between versions"):
            sender.publish(iter(_version(0.0)[:2]), version=4)
        with pytest.raises(FileNotFoundError, match="set weights.transport=broadcast"):
            ShmReceiver(str(tmp_path / "elsewhere")).receive(m3)
    finally:
        sender.close()
    assert not any((tmp_path / "trainer").iterdir())  # the slot files go with the sender


def test_layout_puts_fused_siblings_back_to_back() -> None:
    """q/k/v and gate/up of one module (arriving in name order, 13-element rows: no natural alignment)
    lie back to back in the engine's fused order; every other tensor starts aligned; the entries keep
    the arrival order (streaming writes rely on it) and no two tensors overlap."""
    from slime.core.flat_buffer import ALIGN, layout_bytes, plan_layout

    def t(rows: int) -> torch.Tensor:
        return torch.zeros(rows, 13)

    attn = "model.layers.0.self_attn."
    mlp = "model.layers.0.mlp."
    names = [
        f"{mlp}down_proj.weight",
        f"{mlp}gate_proj.weight",
        f"{mlp}up_proj.weight",
        f"{attn}k_proj.weight",
        f"{attn}o_proj.weight",
        f"{attn}q_proj.weight",
        f"{attn}v_proj.weight",
    ]
    rows = {"down": 3, "gate": 5, "up": 5, "k": 2, "o": 4, "q": 4, "v": 2}
    tensors = [(n, t(rows[n.rsplit(".", 2)[-2].split("_")[0]])) for n in names]
    entries = plan_layout(tensors)
    assert [e[0] for e in entries] == names
    at = {name: (offset, offset + 4 * 13 * shape[0]) for name, _, shape, offset in entries}
    assert at[f"{attn}q_proj.weight"][1] == at[f"{attn}k_proj.weight"][0]
    assert at[f"{attn}k_proj.weight"][1] == at[f"{attn}v_proj.weight"][0]
    assert at[f"{mlp}gate_proj.weight"][1] == at[f"{mlp}up_proj.weight"][0]
    starts = [
        at[n][0] for n in names if n.rsplit(".", 2)[-2] in ("down_proj", "gate_proj", "o_proj", "q_proj")
    ]
    assert all(s % ALIGN == 0 for s in starts)
    spans = sorted(at.values())
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
    assert layout_bytes(entries) == spans[-1][1]


def test_slots_cast_floating_point_tensors_on_the_way_in(tmp_path: Path) -> None:
    sender = ShmSender(str(tmp_path), timeout_s=30)
    try:
        ids = torch.arange(6)
        for version in (1, 2):  # planning the layout, then streaming into it
            tensors = [*_version(float(version)), ("ids", ids)]
            manifest = sender.publish(iter(tensors), version, dtype=torch.bfloat16)
            got = dict(ShmReceiver(str(tmp_path)).receive(manifest))
            for name, t in tensors:
                want = t.to(torch.bfloat16) if t.is_floating_point() else t
                assert got[name].dtype == want.dtype and torch.equal(got[name], want), name
    finally:
        sender.close()


def test_gloo_broadcast_round_trips_exactly(tmp_path: Path) -> None:
    sender = BroadcastSender(str(tmp_path), bucket_mb=1, backend="gloo", timeout_s=60)
    try:
        channel = for_engine(sender.channel, "engine0", 1)
        box: dict = {}
        joining = threading.Thread(target=lambda: box.update(receiver=open_receiver(channel)))
        joining.start()
        sender.accept("engine0", 1)
        joining.join()
        for version, offset in ((1, 0.0), (2, 1.0)):
            manifest = sender.publish(iter(_version(offset)), version)
            assert manifest.transport == "broadcast" and manifest.slot == "" and not manifest.files
            receiving = threading.Thread(
                target=lambda m=manifest: box.update(got=dict(box["receiver"].receive(m)))
            )
            receiving.start()
            sender.send(manifest, ["engine0"])
            receiving.join()
            for name, t in _version(offset):
                assert torch.equal(box["got"][name], t), name
        old = dataclasses.replace(manifest, version=0)
        with pytest.raises(RuntimeError, match="no longer held"):
            sender.send(old, ["engine0"])
    finally:
        sender.close()


_JOIN_THEN_DIE = """
import json, os, sys
from slime.core.transport import open_receiver
from slime.core.types import WeightChannel
receiver = open_receiver(WeightChannel(**json.loads(sys.argv[1])))
os._exit(3)  # a process that dies with its group open: its socket closes under the sender
"""


def test_a_lost_engine_does_not_cut_the_others_off(tmp_path: Path) -> None:
    """Two engines, one of which dies after joining its group: `send` still delivers the whole
    version to the other (several buckets), reports the lost one by key and drops its group."""
    import subprocess
    import sys

    sender = BroadcastSender(str(tmp_path), bucket_mb=1, backend="gloo", timeout_s=60)
    try:
        lost = for_engine(sender.channel, "lost", 1)
        child = subprocess.Popen([sys.executable, "-c", _JOIN_THEN_DIE, json.dumps(dataclasses.asdict(lost))])
        sender.accept("lost", 1)
        assert child.wait(timeout=60) == 3
        box: dict = {}
        joining = threading.Thread(
            target=lambda: box.update(receiver=open_receiver(for_engine(sender.channel, "up", 1)))
        )
        joining.start()
        sender.accept("up", 1)
        joining.join()
        big = [(f"w{i}", torch.full((1 << 18,), float(i))) for i in range(3)]  # 3 MiB: 3 buckets
        manifest = sender.publish(iter(big), 1)
        receiving = threading.Thread(target=lambda: box.update(got=dict(box["receiver"].receive(manifest))))
        receiving.start()
        unreached = sender.send(manifest, ["lost", "up"])
        receiving.join()
        assert list(unreached) == ["lost"] and unreached["lost"]
        for name, t in big:
            assert torch.equal(box["got"][name], t), name
        with pytest.raises(RuntimeError, match="no weight group"):
            sender.send(manifest, ["lost"])
    finally:
        sender.close()


# --------------------------------------------------------------------------------------------------
# A real trainer pushing to the session's vLLM engine
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trainer(in_process_trainer, tiny_dense_dir):
    """A float32 ZeRO-1 DeepSpeed trainer on tiny_dense, in this process (world size 1)."""
    w = new_worker(tiny_dense_dir, trainer_cfg(), algo_cfg())
    yield w
    w.close()


async def assert_engine_serves_trainer(engine, w, tokenizer, tiny_dense_dir: str, version: int) -> None:
    from transformers import AutoModelForCausalLM

    prompt = tokenizer.encode("Once upon a time there was a cat")
    out = await engine.generate(prompt, SamplingParams(max_tokens=12, temperature=1.0, seed=3))
    assert out.versions == [version] * 12
    ours = token_logprobs(w.policy, prompt + out.token_ids, len(prompt))
    diffs = [abs(a - b) for a, b in zip(out.logprobs, ours, strict=True)]
    assert sum(diffs) / len(diffs) < TOL_MEAN and max(diffs) < TOL_MAX, diffs
    # The check can tell: the checkpoint's own weights score these tokens differently.
    before = AutoModelForCausalLM.from_pretrained(tiny_dense_dir, dtype=torch.float32).eval()
    lp0 = token_logprobs(before, prompt + out.token_ids, len(prompt))
    assert max(abs(a - b) for a, b in zip(lp0, ours, strict=True)) > 1e-2


async def test_broadcast_push_reaches_an_engine_with_its_own_weights_dir(
    trainer, engine, tokenizer, tiny_dense_dir, tmp_path
) -> None:
    trainer_dir, engine_dir = tmp_path / "trainer", tmp_path / "engine"
    engine_dir.mkdir()
    try:
        # Control: told to map shm slots from its own dir, the engine finds none of the trainer's.
        shm = trainer.open_weights("shm", str(trainer_dir), 1, "gloo", 60)
        await engine.open_weights(dataclasses.replace(shm, weights_dir=str(engine_dir)))
        trainer.train_step(make_groups(tokenizer, seed=0), version=0)
        manifest = trainer.publish_weights(engine.version + 1)
        assert manifest.transport == "shm"
        with pytest.raises(Exception, match="set weights.transport=broadcast"):
            await engine.update_weights(manifest)

        channel = trainer.open_weights("broadcast", str(trainer_dir), 1, "gloo", 120)
        own = dataclasses.replace(for_engine(channel, "engine0", 1), weights_dir=str(engine_dir))
        await asyncio.gather(
            asyncio.to_thread(trainer.accept_weights, "engine0", 1), engine.open_weights(own)
        )
        for step in (1, 2):  # two versions: both slots, each sent over the group
            trainer.train_step(make_groups(tokenizer, seed=step), version=step)
            version = engine.version + 1
            manifest = trainer.publish_weights(version)
            assert manifest.transport == "broadcast" and manifest.slot == "" and not manifest.files
            shutil.rmtree(trainer_dir, ignore_errors=True)  # the trainer sends from its mapping; no file
            assert not trainer_dir.exists()  # is left that anything could read
            await asyncio.gather(
                asyncio.to_thread(trainer.send_weights, manifest, ["engine0"]),
                engine.update_weights(manifest),
            )
            assert engine.last_update["num_tensors"] == manifest.num_tensors
            assert engine.last_update["refreshed"] == ["lm_head"]  # the tied head's stale-prepack guard
            assert os.listdir(engine_dir) == []
            await assert_engine_serves_trainer(engine, trainer, tokenizer, tiny_dense_dir, version)
    finally:
        await restore_weights(engine, tiny_dense_dir)


async def test_shm_push_from_the_trainer(trainer, engine, tokenizer, tiny_dense_dir, tmp_path) -> None:
    try:
        channel = trainer.open_weights("shm", str(tmp_path), 64, "gloo", 60)
        await engine.open_weights(channel)
        trainer.train_step(make_groups(tokenizer, seed=3), version=3)
        version = engine.version + 1
        manifest = trainer.publish_weights(version)
        await engine.update_weights(manifest)
        assert engine.last_update["refreshed"] == ["lm_head"]
        await assert_engine_serves_trainer(engine, trainer, tokenizer, tiny_dense_dir, version)
    finally:
        await restore_weights(engine, tiny_dense_dir)


# --------------------------------------------------------------------------------------------------
# MoE and the transformers engine, both transports
# --------------------------------------------------------------------------------------------------


def max_error(model, prompt: list[int], out) -> float:
    ref = token_logprobs(model, prompt + out.token_ids, len(prompt))
    return max(abs(a - b) for a, b in zip(out.logprobs, ref, strict=True))


async def push_both_ways(eng, model_dir: str, tokenizer, tmp_path: Path) -> list[dict]:
    """Push two perturbed versions of `model_dir` into `eng`: through shm, then broadcast. After each,
    the engine's logprobs are the perturbed model's. Returns the engine's last_update of each."""
    prompts = [tokenizer.encode(f"Question {i}: what is {i} plus {i + 1}?") for i in range(3)]
    updates = []
    shm = ShmSender(str(tmp_path / "shm"), timeout_s=60)
    bcast = BroadcastSender(str(tmp_path / "bcast"), bucket_mb=1, backend="gloo", timeout_s=120)
    try:
        for version, sender in ((1, shm), (2, bcast)):
            model = perturbed(model_dir, seed=version)
            channel = sender.channel
            if sender is bcast:
                channel = for_engine(channel, "e", 1)
                await asyncio.gather(asyncio.to_thread(sender.accept, "e", 1), eng.open_weights(channel))
            else:
                await eng.open_weights(channel)
            manifest = sender.publish(iter(checkpoint_tensors(model).items()), version)
            await asyncio.gather(
                asyncio.to_thread(sender.send, manifest, ["e"]), eng.update_weights(manifest)
            )
            updates.append(dict(eng.last_update))
            assert updates[-1]["num_tensors"] == manifest.num_tensors
            outs = await asyncio.gather(*[eng.generate(p, SamplingParams(max_tokens=12)) for p in prompts])
            for p, o in zip(prompts, outs, strict=True):
                assert o.versions == [version] * 12
                assert max_error(model, p, o) < TOL_MAX
    finally:
        shm.close()
        bcast.close()
    return updates


def aliasing_engine(model_dir: str, work_dir: Path):
    """A float32, one-thread vLLM engine asked to serve pushed weights from the shm slot."""
    from rollout.engines.vllm import VLLMEngine

    return VLLMEngine(
        model_dir, dtype="float32", kv_cache_gib=1, work_dir=str(work_dir), num_threads=1, weight_alias=True
    )


async def test_moe_in_vllm_both_transports(tiny_moe_dir, tokenizer, tmp_path) -> None:
    """Per-expert checkpoint names; the CPU experts are repacked after each push (stale packed
    experts would give errors of ~0.04). Asked for weight aliases, the MoE engine keeps vLLM's
    reload (rollout/engines/cpu_alias.py covers dense layers only)."""
    eng = aliasing_engine(tiny_moe_dir, tmp_path / "moe")
    await eng.start()
    try:
        updates = await push_both_ways(eng, tiny_moe_dir, tokenizer, tmp_path)
        assert all(len(u["refreshed"]) == 2 for u in updates)  # one fused-experts layer per decoder layer
        assert not any(u["aliased"] for u in updates)
    finally:
        await eng.shutdown()


async def test_weight_alias_serves_each_version_from_its_slot(tiny_dense_dir, tokenizer, tmp_path) -> None:
    """rollout.weight_alias: the engine's parameters become views of the trainer's shm slot. Three
    versions go through the two alternating slots; after each, the engine's logprobs are that
    version's, with no reload (`aliased`); writing the next version into the other slot leaves the
    served one alone (checked before the engine loads it), and the engine holds no copy of its own."""
    eng = aliasing_engine(tiny_dense_dir, tmp_path / "dense")
    prompts = [tokenizer.encode(f"Question {i}: what is {i} plus {i + 1}?") for i in range(3)]
    sender = ShmSender(str(tmp_path / "shm"), timeout_s=60)
    await eng.start()

    async def errors(model, version: int) -> float:
        outs = await asyncio.gather(*[eng.generate(p, SamplingParams(max_tokens=12)) for p in prompts])
        assert all(o.versions == [version] * 12 for o in outs)
        return max(max_error(model, p, o) for p, o in zip(prompts, outs, strict=True))

    try:
        await eng.open_weights(sender.channel)
        models = {v: perturbed(tiny_dense_dir, seed=v) for v in (1, 2, 3)}
        slots = set()
        for version, model in models.items():
            manifest = sender.publish(iter(checkpoint_tensors(model).items()), version)
            slots.add(manifest.slot)
            if version > 1:  # the new version is written, not loaded: the engine still serves the last
                assert await errors(models[version - 1], version - 1) < TOL_MAX
            await eng.update_weights(manifest)
            assert eng.last_update["aliased"], eng.last_update
            assert await errors(model, version) < TOL_MAX
        assert len(slots) == 2
        # The served weights are the slot's memory: a write into the slot shows in the engine.
        (sums,) = await eng.collective_rpc("slime_param_checksums", ["model.norm.weight"])
        views = dict(ShmReceiver(sender.channel.weights_dir).receive(manifest))
        assert sums["model.norm.weight"] == pytest.approx(float(views["model.norm.weight"].sum()), rel=1e-6)
        views["model.norm.weight"].add_(1.0)
        (moved,) = await eng.collective_rpc("slime_param_checksums", ["model.norm.weight"])
        assert moved["model.norm.weight"] == pytest.approx(
            sums["model.norm.weight"] + views["model.norm.weight"].numel(), rel=1e-5
        )
    finally:
        sender.close()
        await eng.shutdown()


async def test_transformers_engine_both_transports(tiny_dense_dir, tokenizer, tmp_path) -> None:
    from rollout.engines.hf import TransformersEngine

    eng = TransformersEngine(tiny_dense_dir, dtype="float32", max_batch_size=4)
    await eng.start()
    try:
        await push_both_ways(eng, tiny_dense_dir, tokenizer, tmp_path)
    finally:
        await eng.shutdown()


# --------------------------------------------------------------------------------------------------
# A real run
# --------------------------------------------------------------------------------------------------


def _kill_our_rollout_worker_after_first_push(metrics: Path, done: threading.Event) -> None:
    """Once the run logged a step (so a version was pushed), SIGKILL its rollout worker: a process
    under this test process (Ray's workers are children of the raylet this process started)."""
    import json
    import time

    import psutil

    while not done.is_set():
        if metrics.exists() and any(json.loads(x) for x in metrics.read_text().splitlines() if x.strip()):
            break
        time.sleep(0.2)  # polling a file another process writes: nothing to await
    for proc in psutil.Process().children(recursive=True):
        try:
            if any("RolloutWorker" in part for part in proc.cmdline()):
                proc.kill()
                done.set()
                return
        except psutil.Error:
            continue


@pytest.mark.slow
def test_a_broadcast_run_resends_the_version_to_a_restarted_worker(tmp_path: Path, ray_cluster) -> None:
    """weights.transport=broadcast through the whole loop; the one rollout worker is killed after the
    first push, and the restarted engine joins a new group and gets the current version over it.
    Synchronous, so the engine's logprobs are the trainer's up to float noise (stale weights would
    show in mismatch/logprob_abs)."""
    from slime import api

    run_dir = tmp_path / "run"
    killed = threading.Event()
    killer = threading.Thread(
        target=_kill_our_rollout_worker_after_first_push, args=(run_dir / "metrics.jsonl", killed)
    )
    killer.start()
    try:
        rows = api.run(
            ["+experiment=tiny", "trainer.steps=4", "buffer.max_staleness=0", "weights.transport=broadcast"],
            run_dir=str(run_dir),
        )
    finally:
        killed.set()
        killer.join()
    assert [r["version"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["rollout/restarts"] == 1  # the kill happened after step 0's push
    assert max(r["mismatch/logprob_abs"] for r in rows) < 0.02
