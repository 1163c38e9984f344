"""A trainer rank's train step: one batch (this rank's shard of whole groups) planned into
micro-batches, scored before the update, given advantages, trained by ppo_epochs x num_minibatches
optimizer steps, and its metrics reduced over every rank. LR: linear warm-up over
`trainer.warmup_steps` train steps (batches), then constant; a pure function of the step counter, so
resuming needs no scheduler state.

`TrainStep` is the step half of `TrainerRank` (trainer/rank.py), which inherits it: the rank's state
(declared on `TrainerRank`, built by its `setup`: the spec and configs, the DeepSpeed models,
`forward`, `routing`, `indexing`, `comm`, ...) lives there, the order of one step here. The step's
parts are modules of their own: micro-batches (trainer/batching.py), forwards (trainer/forward.py),
the objective (trainer/objective.py), metrics (trainer/step_metrics.py).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import torch

from slime.core.types import Group
from trainer import objective as obj
from trainer.batching import SeqRef, flatten_groups, make_micro_batches, minibatch_split, num_micro_batches
from trainer.forward import to_device, values
from trainer.step_metrics import StepMetrics

log = logging.getLogger(__name__)


def resolve_groups(groups: list[Any]) -> list[Group]:
    """A shard as the controller sends it: Ray references to groups (fetched here, straight from the
    replay buffer's object store), or the groups themselves (in-process callers, tests)."""
    refs = [i for i, g in enumerate(groups) if not isinstance(g, Group)]
    if not refs:
        return list(groups)
    import ray

    fetched = ray.get([groups[i] for i in refs])
    out = list(groups)
    for i, g in zip(refs, fetched, strict=True):
        out[i] = g
    return out


class TrainStep:
    """`TrainerRank.train_step` and its parts; a mixin of `TrainerRank` (trainer/rank.py), whose
    attributes these methods read."""

    def train_step(self, groups: list[Group], version: int) -> dict[str, float]:
        """One batch (this rank's shard of whole groups): advantages, then ppo_epochs x
        num_minibatches optimizer steps. Returns metrics reduced over all ranks (the same on every
        rank); `loss/policy` is the global minibatch loss averaged over the optimizer steps."""
        if self.policy is None:
            raise RuntimeError("TrainerRank.setup() must run before train_step()")
        groups = resolve_groups(groups)
        if not groups:
            raise ValueError(f"trainer rank {self.rank} got no groups (batch_groups must be >= num_ranks)")
        t0 = time.perf_counter()
        self.forward.flops_done = 0.0
        lr = self._set_lr()
        m = StepMetrics()
        refs = flatten_groups(groups)
        # Sequence advantages before planning when zero-advantage sequences can be left out
        # (objective.py); otherwise after scoring, which kl_mode=reward and GAE need.
        seq_adv = self._sequence_advantages(groups, refs, []) if self.skip_zero_advantage else None
        skip = obj.zero_advantage_indices(seq_adv) if seq_adv is not None else set()
        plan, skipped = self._plan_micro_batches(refs, skip)
        for w in (w for mini in plan for w in mini):
            w.version = version
        self._score_before_update(plan, m)
        self._score_behavior_versions(plan, version)
        self._compute_advantages(plan, groups, refs, seq_adv)
        counts = obj.StepCounts.of(plan, self.algo.loss_agg, skipped, self.max_positions).all_reduce(
            self.comm
        )
        norms = obj.normalisers(counts, plan, self.spec.max_response_len, self.comm)
        grad_norms, critic_norms = self._optimize(plan, norms, m)
        self.step += 1
        return self._reduce_metrics(m, counts, grad_norms, critic_norms, lr, version, t0)

    def _set_lr(self) -> float:
        cfg = self.cfg
        lr = cfg.lr * min(1.0, (self.step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else cfg.lr
        for g in self.policy.optimizer.param_groups:
            g["lr"] = lr
        return lr

    def _plan_micro_batches(self, refs: list[SeqRef], skip: set[int]) -> tuple[obj.Plan, list[list[SeqRef]]]:
        """Minibatches of micro-batches, and per minibatch the sequences left out (`skip`: indices into
        the flattened batch, taken out after the minibatch split so that no sequence changes
        minibatch); every rank gets the same number of micro-batches in each minibatch (one
        all-reduce for all of them), padding with dummies."""
        gen = None
        if self.algo.num_minibatches > 1:
            gen = torch.Generator().manual_seed(self.spec.seed * 1_000_003 + self.step)
        if self.max_positions is not None:
            too_long = sum(len(r.traj.token_ids) > self.max_positions for r in refs)
            if too_long:
                log.warning(
                    "rank %d: %d sequence(s) exceed the model's %d positions and are cut to fit",
                    self.rank,
                    too_long,
                    self.max_positions,
                )
        minis = minibatch_split(refs, self.algo.num_minibatches, gen)
        skipped = [[r for r in mini if r.index in skip] for mini in minis]
        minis = [[r for r in mini if r.index not in skip] for mini in minis]
        local = [float(num_micro_batches(len(mini), self.cfg.micro_batch_size)) for mini in minis]
        counts = [int(c) for c in self.comm.all_reduce(local, "max")]
        plan = []
        for mini, n in zip(minis, counts, strict=True):
            mbs = make_micro_batches(
                mini,
                n,
                self.pad_id,
                max_len=self.max_positions,
                filler=refs[0],
                by_tokens=self.forward.pack,
                share=self.forward.share_prefix,
            )
            plan.append([obj.Scored(mb=to_device(mb, self.device)) for mb in mbs])
        return plan, skipped

    @torch.no_grad()
    def _score_before_update(self, plan: obj.Plan, m: StepMetrics) -> None:
        """Proximal logprobs (when needed), reference logprobs and critic values with the weights
        before any update."""
        need_prox = obj.needs_proximal(self.algo)
        if not (need_prox or self.reference is not None or self.critic is not None):
            return
        for w in (w for mini in plan for w in mini):
            if need_prox:
                w.prox = self.forward.logprobs(
                    self.policy, w.mb, self.routing, measure=True, indexing=self.indexing
                ).float()
            if self.reference is not None:
                w.ref = self.forward.logprobs(self.reference, w.mb).float()
            if self.critic is not None:
                w.old_values = values(self.critic, w.mb).detach()
        if need_prox:
            for w in (w for mini in plan for w in mini):
                mismatch = obj.masked_abs_mean(w.mb.behavior_logprobs, w.prox, w.mb.loss_mask)
                m.mean("mismatch/logprob_abs", mismatch, float(w.mb.num_loss_tokens))

    def _trainable(self) -> list[torch.Tensor]:
        return [p for p in self.policy.module.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def _weights_of(self, version: int) -> Iterator[None]:
        """The policy's trainable weights set to those it had at `version` (a kept snapshot) inside the
        block, for no-grad forwards; its own are put back after (by reference, no copies)."""
        params = self._trainable()
        own = [p.data for p in params]
        try:
            for p, snap in zip(params, self.snapshots[version], strict=True):
                p.data = snap
            yield
        finally:
            for p, data in zip(params, own, strict=True):
                p.data = data

    @torch.no_grad()
    def _score_behavior_versions(self, plan: obj.Plan, version: int) -> None:
        """With algorithm.behavior_snapshots = K > 0: every stale token whose version's weights are
        kept gets the trainer's logprob under them (`w.beh` where `w.beh_known`; one forward per kept
        version over the micro-batches holding its tokens), so the factored correction separates the
        train-inference discrepancy from staleness exactly (trainer/importance.py). Then this version's
        weights join the snapshots and the oldest beyond K go."""
        k = self.algo.behavior_snapshots
        if k <= 0:
            return
        works = [w for mini in plan for w in mini]
        for w in works:
            w.beh = torch.zeros_like(w.mb.behavior_logprobs)
            w.beh_known = torch.zeros_like(w.mb.loss_mask, dtype=torch.bool)
        for v in [v for v in self.snapshots if v < version]:
            holding = [w for w in works if w.mb.versions is not None and bool((w.mb.versions == v).any())]
            if not holding:
                continue
            with self._weights_of(v):
                for w in holding:
                    lp = self.forward.logprobs(
                        self.policy, w.mb, self.routing, indexing=self.indexing
                    ).float()
                    mine = w.mb.versions == v
                    w.beh = torch.where(mine, lp, w.beh)
                    w.beh_known |= mine
        self.snapshots[version] = [p.detach().clone() for p in self._trainable()]
        for old in [v for v in self.snapshots if v <= version - k]:
            del self.snapshots[old]

    def _sequence_advantages(self, groups: list[Group], refs: list[SeqRef], plan: obj.Plan) -> torch.Tensor:
        """[N_local] advantages of this rank's sequences from the global batch's rewards (a collective)."""
        rewards = obj.shaped_rewards(refs, plan, self.algo, self.spec.max_response_len)
        return obj.sequence_advantages_of_episodes(groups, refs, rewards, self.algo, self.comm)

    def _compute_advantages(
        self, plan: obj.Plan, groups: list[Group], refs: list[SeqRef], seq_adv: torch.Tensor | None
    ) -> None:
        """Every micro-batch's per-token advantages (`seq_adv`: the sequence advantages when they were
        computed before planning)."""
        if self.algo.advantage == "gae":
            rewards = obj.shaped_rewards(refs, plan, self.algo, self.spec.max_response_len)
            obj.assign_gae_advantages(plan, rewards, self.algo, self.comm)
            if self.algo.distill.teacher:
                obj.add_distillation(plan, self.algo)
            return
        if seq_adv is None:
            seq_adv = self._sequence_advantages(groups, refs, plan)
        obj.assign_sequence_advantages(plan, seq_adv)
        if self.algo.distill.teacher:
            obj.add_distillation(plan, self.algo)

    def _optimize(
        self, plan: obj.Plan, norms: obj.Normalisers, m: StepMetrics
    ) -> tuple[list[float], list[float]]:
        """ppo_epochs passes of one optimizer step per minibatch; returns the policy's and the
        critic's gradient norms, one per step."""
        from trainer.build import grad_norm

        grad_norms: list[float] = []
        critic_norms: list[float] = []
        for _ in range(self.algo.ppo_epochs):
            for i, mini in enumerate(plan):
                share = 0.0  # this rank's share of the global minibatch loss
                for w in mini:
                    share += self._micro_step(i, w, norms, m)
                with self._ess_step(mini, m):
                    self.policy.step()
                grad_norms.append(grad_norm(self.policy))
                if self.critic is not None:
                    self.critic.step()
                    critic_norms.append(grad_norm(self.critic))
                # The reduce divides by (ranks x steps), so scaling each rank's share by the world
                # size yields the global minibatch loss averaged over the optimizer steps.
                m.mean("loss/policy", share * self.world_size, 1.0)
        return grad_norms, critic_norms

    @contextlib.contextmanager
    def _ess_step(self, mini: list[obj.Scored], m: StepMetrics) -> Iterator[None]:
        """VCPO-style step control (algorithm.ess_lr_power > 0): this optimizer step's learning rate
        times ESS^power, ESS the normalised effective sample size of the importance weights the
        minibatch's loss applied (over every rank; trainer/importance.py `ess`)."""
        power = self.algo.ess_lr_power
        if power <= 0:
            yield
            return
        from trainer.importance import ess, ess_lr_scale

        local = [sum(w.is_sums[i] for w in mini) for i in range(3)]
        total, total_sq, n = self.comm.all_reduce(local)
        value = ess(total / max(n, 1.0), total_sq / max(n, 1.0))
        scale = ess_lr_scale(value, power, self.algo.ess_lr_floor)
        m.mean("offpolicy/lr_scale", scale, 1.0)
        groups = self.policy.optimizer.param_groups
        base = [g["lr"] for g in groups]
        for g in groups:
            g["lr"] = g["lr"] * scale
        try:
            yield
        finally:
            for g, lr in zip(groups, base, strict=True):
                g["lr"] = lr

    def _micro_step(self, minibatch: int, w: obj.Scored, norms: obj.Normalisers, m: StepMetrics) -> float:
        """Forward and backward of one micro-batch; returns its weighted policy loss. DeepSpeed
        averages gradients over ranks, so the weighted losses are scaled by the world size."""
        weight = norms.policy_weight(minibatch, w.mb, self.algo.loss_agg)
        # The first policy forward of this micro-batch in the step (no proximal pass) is measured.
        # [B, T, V], or [1, K, V] packed with its layout
        logits, layout = self.forward.kept_logits(
            self.policy, w.mb, self.routing, measure=w.prox is None, indexing=self.indexing
        )
        total, policy = obj.micro_step_loss(
            logits, w, self.algo, self.forward.temperature, norms.loss_norm, weight, m, layout
        )
        if self.routing is not None:
            router_losses = self.routing.take_losses()
            if router_losses is not None:
                aux_coef, z_coef = self.router_coefs
                total = total + aux_coef * router_losses[0] + z_coef * router_losses[1]
        self.policy.backward(total * (weight * self.world_size))
        if self.critic is not None:
            vl = obj.value_step_loss(values(self.critic, w.mb), w, self.algo, m)
            self.critic.backward(vl * (norms.value_weight(minibatch, w.mb) * self.world_size))
        return weight * float(policy)

    def _reduce_metrics(
        self,
        m: StepMetrics,
        counts: obj.StepCounts,
        grad_norms: list[float],
        critic_norms: list[float],
        lr: float,
        version: int,
        t0: float,
    ) -> dict[str, float]:
        metrics = m.reduce(self.comm)
        from trainer.importance import ess

        # Normalised effective sample size of the applied and of the untouched importance weights.
        metrics["offpolicy/ess"] = ess(
            metrics.pop("offpolicy/w_mean", 0.0), metrics.pop("offpolicy/w_sq_mean", 0.0)
        )
        metrics["offpolicy/ess_raw"] = ess(
            metrics.pop("offpolicy/raw_w_mean", 0.0), metrics.pop("offpolicy/raw_w_sq_mean", 0.0)
        )
        if self.routing is not None:
            metrics.update(self.routing.reduce_metrics(self.comm))
        if self.indexing is not None:
            metrics.update(self.indexing.reduce_metrics(self.comm))
        train_s = self.comm.all_reduce([time.perf_counter() - t0], "max")[0]
        flops, peak = self.comm.all_reduce([self.forward.flops_done, self.peak_flops])
        metrics.update(
            {
                "adv/mean": counts.adv.mean,
                # Unbiased, like the whitening: a whitened batch reports exactly 1.
                "adv/std": counts.adv.var**0.5,
                "grad_norm": sum(grad_norms) / len(grad_norms),
                "lr": lr,
                "time/train_s": train_s,
                # Real tokens (prompts included, padding never) per second of the step.
                "perf/train_tokens_per_s": counts.tokens / max(train_s, 1e-9),
                # Zero-advantage sequences the step left out of its forward and backward.
                "train/skipped_sequences": counts.skipped_sequences,
                # Model FLOPs of the step's policy and reference passes over the ranks' measured
                # peak (trainer/flops.py); the critic's passes are not counted.
                "perf/mfu": flops / max(train_s * peak, 1e-9),
                "train/tokens": counts.tokens + counts.skipped_tokens,
                "train/loss_tokens": counts.adv.count,
                "train/sequences": counts.sequences,
                "train/optimizer_steps": float(self.algo.ppo_epochs * self.algo.num_minibatches),
                "train/version": float(version),
            }
        )
        if critic_norms:
            metrics["critic/grad_norm"] = sum(critic_norms) / len(critic_norms)
        return metrics
