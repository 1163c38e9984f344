"""One DeepSpeed trainer rank: a transformers causal LM (dense or MoE) under ZeRO 0-3.

`TrainerRank` is a plain class: tests drive it in-process (world size 1), and `trainer.actors`
wraps it in a Ray actor per rank. All ranks must call `setup`, `train_step`, `publish_weights`,
`save_checkpoint` and `load_checkpoint` together (they contain collectives).

The parts, each in its own module: the process (threads, process group: trainer/process.py),
building the DeepSpeed models and their precision (trainer/build.py), the forward passes
(trainer/forward.py), the objective (rewards, advantages, normalisers, the micro-step loss:
trainer/objective.py), weights out (trainer/export.py) and the train step itself
(trainer/train_step.py, `TrainStep`, which this class inherits). This class holds a rank's state:
it builds it (`setup`), releases it (`close`) and carries the weights out (pushes, checkpoints).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from slime.core.config import AlgorithmConfig, ModelConfig, TrainerConfig
from slime.core.logs import send_output_to
from slime.core.transport import WeightSender
from slime.core.types import WeightChannel, WeightManifest
from trainer import objective as obj
from trainer.flops import ModelFlops
from trainer.forward import Forward
from trainer.indexer import Indexing, find_indexer_sites
from trainer.process import Collectives
from trainer.routing import Routing, model_router_coefs
from trainer.train_step import TrainStep

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


class TrainerRank(TrainStep):
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
