"""One DeepSpeed trainer rank: a transformers causal LM (dense or MoE) under ZeRO 0-3.

`TrainerRank` is a plain class: tests drive it in-process (world size 1), and `trainer.actors`
wraps it in a Ray actor per rank. All ranks must call `setup`, `train_step`, `publish_weights`,
`save_checkpoint` and `load_checkpoint` together (they contain collectives).

The parts, each in its own module: the process (threads, process group: trainer/process.py),
building the DeepSpeed models and their precision (trainer/build.py), the forward passes
(trainer/forward.py), the objective (rewards, advantages, normalisers, the micro-step loss:
trainer/objective.py) and weights out (trainer/export.py). This class holds a rank's state and runs
the step. LR: linear warm-up over `trainer.warmup_steps` train steps (batches), then constant; a
pure function of the step counter, so resuming needs no scheduler state.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from slime.core.config import AlgorithmConfig, ModelConfig, TrainerConfig
from slime.core.logs import send_output_to
from slime.core.transport import WeightSender
from slime.core.types import Group, WeightChannel, WeightManifest
from trainer import objective as obj
from trainer.batching import SeqRef, flatten_groups, make_micro_batches, minibatch_split, num_micro_batches
from trainer.flops import ModelFlops
from trainer.forward import Forward, to_device, values
from trainer.indexer import Indexing, find_indexer_sites
from trainer.process import Collectives
from trainer.routing import Routing, model_router_coefs
from trainer.step_metrics import StepMetrics

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class TrainerSpec:
    """What every rank is built from (the same on every rank).

    `max_response_len` is the generated-token limit used by DAPO overlong shaping (required when
    algorithm.overlong_buffer > 0) and as the seq_sum_norm constant. `temperature` is the rollout's
    sampling temperature: every logprob, entropy and KL term is of softmax(logits / temperature),
    the policy the engine sampled from and reported logprobs for.
    """

    model_dir: str
    model: ModelConfig
    trainer: TrainerConfig
    algorithm: AlgorithmConfig
    seed: int
    max_response_len: int = 0
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(
                f"rollout.temperature must be > 0 to train on its logprobs, got {self.temperature}"
            )
        if self.algorithm.overlong_buffer > 0 and self.max_response_len <= 0:
            raise ValueError(
                "algorithm.overlong_buffer > 0 needs max_response_len (the generated-token limit)"
            )
        ep = self.trainer.expert_parallel_size
        if ep < 1 or self.trainer.num_ranks % ep:
            raise ValueError(
                f"trainer.expert_parallel_size ({ep}) must be >= 1 and divide trainer.num_ranks "
                f"({self.trainer.num_ranks})"
            )


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


class TrainerRank:
    """One data-parallel trainer rank.

    Construction is cheap (no DeepSpeed, no process group); `setup()` joins the process group and
    builds the models. The DeepSpeed models are `policy`, `critic` (advantage=gae) and `reference`
    (algorithm.kl_coef > 0: a frozen copy, replicated for ZeRO 0-2 and a partitioned optimizer-less
    ZeRO-3 model for stage 3; with LoRA the policy with its adapters disabled, trainer/lora.py).
    """

    spec: TrainerSpec
    cfg: TrainerConfig  # spec.trainer
    algo: AlgorithmConfig  # spec.algorithm
    rank: int
    world_size: int
    step: int  # train steps done (batches); drives the LR warm-up
    # Set by setup():
    policy: Any  # DeepSpeed model of the policy (None before setup and after close)
    critic: Any  # DeepSpeed model of the critic, or None
    reference: Any  # frozen reference model (a module, or a ZeRO-3 DeepSpeed model), or None
    forward: Forward
    routing: Routing | None  # MoE router hooks of the policy (trainer/routing.py); None when dense
    indexing: Indexing | None  # sparse-attention indexer hooks (trainer/indexer.py); None for dense attention
    router_coefs: tuple[float, float]  # (aux, z) router-loss coefficients in effect
    comm: Collectives
    device: torch.device
    bf16: bool
    export_dtype: torch.dtype  # model.dtype: what weight pushes and checkpoints carry
    pad_id: int
    max_positions: int | None  # the model's context; longer sequences are cut (with a warning)
    num_params: int
    num_trainable: int  # parameters the optimizer updates (the adapters only with LoRA)
    model_flops: ModelFlops  # what the policy's tokens cost (trainer/flops.py), for perf/mfu
    peak_flops: float  # matmul FLOP/s of this rank's device, dtype and threads, measured at setup
    setup_s: float
    _process_env: contextlib.ExitStack  # what setup() set in this process for the rank's lifetime

    def __init__(self, spec: TrainerSpec, rank: int = 0, world_size: int = 1, log_path: str = "") -> None:
        """`log_path`: the file this rank's process writes its output to (an actor's: slime/core/logs.py);
        empty leaves the output where it is (a rank built inside a test process)."""
        if log_path:
            send_output_to(log_path)
        self.spec = spec
        self.cfg = spec.trainer
        self.algo = spec.algorithm
        self.rank = rank
        self.world_size = world_size
        self.step = 0
        self.policy = self.critic = self.reference = None
        self.routing = None
        self.indexing = None
        self.router_coefs = (0.0, 0.0)
        self.skip_zero_advantage = False
        self.setup_s = 0.0
        self._process_env = contextlib.ExitStack()
        self.weight_sender: WeightSender | None = None  # rank 0's end of the weight transport
        # Trainable weights of past policy versions (algorithm.behavior_snapshots): version -> tensors
        # in `_trainable()` order, to score stale tokens under their own version (trainer/importance.py).
        self.snapshots: OrderedDict[int, list[torch.Tensor]] = OrderedDict()

    # -- lifecycle --------------------------------------------------------------------------------
    def node_address(self) -> tuple[str, int]:
        """(this node's IP, a free port): rank 0's answer becomes the process group's rendezvous."""
        from trainer.process import free_port, node_ip

        return node_ip(), free_port()

    def setup(self, master_addr: str | None = None, master_port: int | None = None) -> dict[str, Any]:
        """Join the process group at master_addr:master_port (default for one rank: this host, a free
        port) and build the policy (plus reference model and critic when the algorithm needs them).
        Returns facts for the log: precision, parameters, seconds."""
        from slime.core.cores import CoreShare, set_thread_budget
        from slime.core.model import load_tokenizer, resolve_dtype
        from trainer.build import build_frozen, build_trainable, load_causal_lm, no_dropout, resolve_precision
        from trainer.flops import measure_peak_flops, model_flops
        from trainer.forward import ValueModel
        from trainer.packing import use_segment_attention
        from trainer.process import free_port, join_process_group, local_rank_env

        t0 = time.perf_counter()
        spec, cfg = self.spec, self.cfg
        cores: CoreShare | None = None  # auto threads: rechecked before each forward
        if cfg.threads_per_rank:
            set_thread_budget(cfg.threads_per_rank)
        else:
            cores = CoreShare.in_this_process(cfg.num_ranks)
            cores.adjust()
        if master_addr is None or master_port is None:
            if self.world_size > 1:
                raise ValueError("setup() of a rank in a group of several needs master_addr and master_port")
            master_addr, master_port = "127.0.0.1", free_port()
        use_cuda = torch.cuda.is_available() and cfg.gpus_per_rank > 0
        join_process_group(self.rank, self.world_size, master_addr, master_port, use_cuda)
        # Ray gives each rank its own visible GPU(s), so the local device is always 0 there.
        self._process_env.enter_context(local_rank_env(0 if use_cuda else self.rank))

        self.bf16 = resolve_precision(resolve_dtype(cfg.dtype), use_cuda)
        self.export_dtype = _DTYPES[resolve_dtype(spec.model.dtype)]
        tok = load_tokenizer(spec.model_dir, spec.model.trust_remote_code)
        self.pad_id = int(tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0))

        torch.manual_seed(spec.seed)
        model = load_causal_lm(spec.model_dir, spec.model)
        self.num_params = sum(p.numel() for p in model.parameters())
        self.model_flops = model_flops(model)
        pack = cfg.pack and self._packable(model)
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
        expert_parallel = None
        if cfg.expert_parallel_size > 1:
            from trainer.expert_parallel import autoep_section

            expert_parallel = autoep_section(cfg, str(model.config.model_type))
        self.router_coefs = model_router_coefs(model.config, cfg.moe.aux_loss_coef, cfg.moe.z_loss_coef)
        if spec.model.lora.r:
            from trainer.lora import wrap

            model = wrap(model, spec.model.lora)  # only the adapters stay trainable (trainer/lora.py)
        self.num_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.policy = build_trainable(model, cfg.lr, cfg, self.bf16, expert_parallel)
        if cores is not None:  # auto threads: take the cores idle engines leave, before every forward
            self.policy.module.register_forward_pre_hook(cores.before_forward)
        replay = str(self.algo.routing_replay)
        self.routing = Routing.install(self.policy.module, replay)
        if self.routing is None and replay != "none":
            raise ValueError(f"algorithm.routing_replay={replay}: {spec.model_dir} has no MoE router")
        if self.routing is not None:
            self.routing.loss_graph = any(c > 0 for c in self.router_coefs)
        indexer_replay = str(self.algo.indexer_replay)
        self.indexing = Indexing.install(self.policy.module, indexer_replay)
        if self.indexing is None and indexer_replay != "none":
            raise ValueError(
                f"algorithm.indexer_replay={indexer_replay}: {spec.model_dir} has no sparse-attention indexer"
            )
        router_losses = self.routing is not None and self.routing.loss_graph
        self.skip_zero_advantage = cfg.skip_zero_advantage and obj.skips_zero_advantage(
            self.algo, router_losses, spec.max_response_len
        )
        self.device = self.policy.device
        self.comm = Collectives(self.rank, self.world_size, self.device)
        # Not under ZeRO-3: its per-parameter gradient hooks reduce a parameter once per forward that
        # used it, and the two forwards of one micro-step broke that (an assertion in stage3.py on MoE).
        self.forward = Forward(
            share_prefix=cfg.share_prefix and not self._zero3,
            temperature=spec.temperature,
            pack=pack,
            flops=self.model_flops,
        )
        self.peak_flops = measure_peak_flops(torch.bfloat16 if self.bf16 else torch.float32, self.device)

        if self.algo.kl_coef > 0 and spec.model.lora.r:
            from trainer.lora import AdaptersOff

            self.reference = AdaptersOff(self.policy)  # the frozen base: no second copy of the model
        elif self.algo.kl_coef > 0:
            reference = load_causal_lm(spec.model_dir, spec.model)
            if pack:
                use_segment_attention(reference)
            self.reference = build_frozen(reference, cfg, self.bf16, self.device)
        if self.algo.advantage == "gae":
            torch.manual_seed(spec.seed)
            critic = ValueModel(spec.model_dir)
            no_dropout(critic)
            self.critic = build_trainable(critic, self.algo.critic_lr, cfg, self.bf16)
        self.setup_s = time.perf_counter() - t0
        return {
            "rank": self.rank,
            "bf16": self.bf16,
            "zero_stage": cfg.zero_stage,
            "expert_parallel_size": cfg.expert_parallel_size,
            "moe_layers": self.routing.layers if self.routing is not None else [],
            "indexer_layers": self.indexing.layers if self.indexing is not None else [],
            "num_params": self.num_params,
            "trainable_params": self.num_trainable,
            "pack": pack,
            "peak_tflops": self.peak_flops / 1e12,
            "reference": self.reference is not None,
            "critic": self.critic is not None,
            "setup_s": self.setup_s,
        }

    def _packable(self, model: Any) -> bool:
        """Whether the policy can run packed forwards (trainer.pack): its attention is sdpa (switched
        to trainer.packing's segment attention here) and a packed forward keeps attention within each
        sequence (`packing_leak`). Otherwise it trains padded, with a warning saying why."""
        from trainer.forward import packing_leak
        from trainer.packing import use_segment_attention

        if find_indexer_sites(model):
            # The indexer builds its key mask from the call's attention mask, which the packed path
            # replaces by a placeholder; segment attention would also ignore the kept keys.
            log.warning(
                "trainer.pack: sparse attention (DSA) needs each sequence's own mask for its indexer, which "
                "the packed path does not build; training padded"
            )
            return False
        if not use_segment_attention(model):
            log.warning(
                "trainer.pack: %s attention has no packed path (sdpa has); training padded",
                model.config._attn_implementation,
            )
            return False
        leak = packing_leak(model)
        if leak is not None:
            log.warning("trainer.pack: %s; training padded", leak)
            model.set_attn_implementation("sdpa")
            return False
        return True

    def close(self) -> None:
        """Release the DeepSpeed models and what setup() set in the process environment (the
        process group stays: it is per process)."""
        if self.routing is not None:
            self.routing.remove()
            self.routing = None
        if self.indexing is not None:
            self.indexing.remove()
            self.indexing = None
        for model in (self.policy, self.critic, self.reference):
            if model is not None and hasattr(model, "destroy"):
                model.destroy()
        self.policy = self.critic = self.reference = None
        self._process_env.close()
        if self.weight_sender is not None:
            self.weight_sender.close()
            self.weight_sender = None

    @property
    def _zero3(self) -> bool:
        return self.cfg.zero_stage == 3

    @property
    def _collective_export(self) -> bool:
        """Whether gathering full weights is a collective: ZeRO-3 partitions, expert parallelism shards
        the experts."""
        return self._zero3 or self.cfg.expert_parallel_size > 1

    # -- the step ---------------------------------------------------------------------------------
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

    def memory(self) -> dict[str, float]:
        """This rank's memory: peak resident set of the process (MB, since it started) and the bytes
        of the policy's parameters it holds (MB)."""
        import resource

        params = sum(p.numel() * p.element_size() for p in self.policy.module.parameters())
        return {
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "param_mb": params / 2**20,
        }

    def expert_shards(self) -> tuple[int, int]:
        """(expert parameters this rank holds, expert parameters of the model) under expert
        parallelism; (0, 0) without it."""
        from trainer.expert_parallel import expert_shards

        return expert_shards(self.policy.module)

    # -- weights and checkpoints ------------------------------------------------------------------
    def full_named_tensors(self, dtype: torch.dtype) -> Any:
        """The policy's full weights under checkpoint names, one layer at a time (a collective under
        ZeRO-3: every rank exhausts it)."""
        from trainer.export import full_named_tensors

        return full_named_tensors(self.policy, self._collective_export, dtype)

    # -- the trainer end of the weight push (slime/weight_push.py drives it; rank 0 hosts the sender)
    def publish_weights(self, version: int) -> WeightManifest | None:
        """Publish the full policy weights (checkpoint names, `model.dtype`) as `version` through
        rank 0's transport (`open_weights` first). All ranks call this (gathering may be collective);
        rank 0 returns the manifest, the others None."""
        from trainer.export import publish_weights

        return publish_weights(
            self.policy, self.rank, self._collective_export, self.export_dtype, version, self.weight_sender
        )

    def node_id(self) -> str | None:
        """This rank's Ray node id (None outside Ray): where weights.transport=auto looks for engines."""
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None

    def open_weights(
        self,
        transport: str,
        weights_dir: str,
        bucket_mb: int,
        backend: str,
        timeout_s: float,
        delta: bool = False,
    ) -> WeightChannel:
        """Rank 0: open the trainer's end of the weight transport (shm, broadcast or files); later
        `publish_weights` calls publish through it. Returns what engines need to open their end."""
        from slime.core.transport import open_sender

        if self.weight_sender is not None:
            self.weight_sender.close()
        self.weight_sender = open_sender(transport, weights_dir, bucket_mb, backend, timeout_s, delta)
        return self.weight_sender.channel

    def accept_weights(self, key: str, ranks: int) -> None:
        """Rank 0: link the engine that opens the channel with `key` (blocks until it joins)."""
        assert self.weight_sender is not None, "open_weights first"
        self.weight_sender.accept(key, ranks)

    def send_weights(
        self, manifest: WeightManifest, keys: list[str], delta_keys: list[str] | None = None
    ) -> dict[str, str]:
        """Rank 0: deliver a published version to the engines `keys` (they receive at the same time;
        `delta_keys` hold the previous version). Returns the engines it could not reach, key -> error."""
        assert self.weight_sender is not None, "open_weights first"
        return self.weight_sender.send(manifest, keys, delta_keys or [])

    def save_checkpoint(self, ckpt_dir: str, step: int, version: int) -> str:
        """DeepSpeed state on every rank, then (rank 0) a transformers export in `<ckpt_dir>/hf` and
        the completion marker. Returns ckpt_dir. All ranks call this."""
        from trainer.export import save_checkpoint

        return save_checkpoint(
            self.policy,
            self.critic,
            rank=self.rank,
            world_size=self.world_size,
            collective=self._collective_export,
            dtype=self.export_dtype,
            model_dir=self.spec.model_dir,
            ckpt_dir=ckpt_dir,
            client_state={"step": int(step), "version": int(version), "train_steps": self.step},
            marker={
                "step": step,
                "version": version,
                "model": self.spec.model.name,
                "zero_stage": self.cfg.zero_stage,
            },
        )

    def load_checkpoint(self, ckpt_dir: str) -> tuple[int, int]:
        """Restore weights, optimizer state and step counters from a checkpoint written by
        `save_checkpoint` (or the latest complete one under a directory of checkpoints).
        Returns (step, version). All ranks call this."""
        from trainer.export import load_checkpoint, load_rng_state

        path, marker, client = load_checkpoint(self.policy, self.critic, ckpt_dir)
        load_rng_state(path, self.rank)
        self.step = int(client.get("train_steps", marker["step"]))
        return int(marker["step"]), int(marker["version"])
