"""One DeepSpeed trainer rank: a transformers causal LM (dense or MoE) under ZeRO 0-3.

`TrainerWorker` is a plain class: tests drive it in-process (world size 1), and `trainer.group`
wraps it in a Ray actor per rank. All ranks must call `setup`, `train_step`, `export_weights`,
`save_checkpoint` and `load_checkpoint` together (they contain collectives).

Decisions (measured on a 2-core AMD EPYC with AVX2 only, shared with other jobs):

- Optimizer: a `torch.optim.AdamW` instance handed to `deepspeed.initialize`
  (`zero_allow_untested_optimizer`), never an "optimizer" block in the DeepSpeed config, which would
  JIT-compile DeepSpeed's CPU Adam (~63 s).
- Communication: gloo on CPU, NCCL with CUDA. DeepSpeed's CPU backend JIT-compiles a shared-memory
  all-reduce op (~47 s) the first time a process group is created; it is only used by
  `inference_all_reduce` (tensor-parallel inference), never by training, so it is switched off by
  marking the op incompatible (`deepspeed.ops.__compatible_ops__`) before DeepSpeed's comm starts.
- Precision: `trainer.dtype=bfloat16` uses DeepSpeed's bf16 mode (bf16 weights and compute, fp32
  master weights and optimizer state) where the hardware has bf16 (CUDA with bf16, or a CPU with
  AVX512-BF16/AMX); elsewhere it falls back to fp32 with a logged warning, because emulated bf16
  matmuls are ~5x slower than fp32 on such CPUs.
- Gradient accumulation is owned by the trainer (`managed_gradient_accumulation: false`): each
  optimizer step runs a variable number of micro-batches and ends with one `engine.step()`.
- Loss normalisation: the loss of one optimizer step is the `algorithm.loss_agg` aggregate over
  the *global* minibatch (all ranks, all micro-batches). `policy_loss` normalises within a
  micro-batch, so micro-batch k's loss is weighted by n_k / N, where n is the number of loss tokens
  (token_mean) or of non-empty sequences (seq_mean, seq_sum_norm) and N its all-reduced total over
  the minibatch; it is further multiplied by the world size because DeepSpeed averages gradients
  over data-parallel ranks. The seq_sum_norm constant is `max_response_len` when given, else the
  longest predicted length of the global batch. Every rank runs the same number of micro-batches
  (empty ones are dummies with weight 0), since ZeRO-3 gathers parameters collectively.
- Proximal logprobs: recomputed with the current weights before the first update when more than one
  optimizer step uses a batch (ppo_epochs * num_minibatches > 1) or when the KL penalty goes into the
  reward; otherwise they equal the detached logprobs of the training forward itself (same weights),
  which saves one forward pass per step.
- Dropout modules are set to p=0: recomputed logprobs must be deterministic for importance ratios.
- LR: linear warm-up over `trainer.warmup_steps` train steps (batches), then constant; a pure
  function of the step counter, so resuming needs no scheduler state.
- Advantages of sequence-level estimators are computed from the rewards of the *global* batch
  (all-gathered), so batch statistics (REINFORCE++) do not depend on the number of ranks.
- Reference model (algorithm.kl_coef > 0): a frozen copy, replicated for ZeRO 0-2 and a partitioned
  optimizer-less ZeRO-3 engine for stage 3. kl_mode=loss adds kl_coef * aggregate(KL) to the loss;
  kl_mode=reward subtracts kl_coef * KL(proximal || reference) from the rewards (summed over a
  sequence's tokens for sequence-level estimators, per token for GAE).
- Critic (advantage=gae): the policy's body plus a zero-initialised scalar head, its own DeepSpeed
  engine and AdamW (algorithm.critic_lr); the outcome reward sits on each sequence's last generated
  token; advantages are whitened over the global batch when algorithm.normalize_adv_std.
- grad_norm is the pre-clip global norm; DeepSpeed reports it for ZeRO 1-3 and bf16, and for ZeRO-0
  in fp32 the trainer clips and measures it itself (`_record_grad_norm`).
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from slime.config import AlgorithmConfig, ModelConfig, TrainerConfig
from slime.types import Group, WeightManifest
from trainer.batching import (
    MicroBatch,
    SeqRef,
    flatten_groups,
    make_micro_batches,
    minibatch_split,
    num_micro_batches,
)

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
_LAYER = re.compile(r"^(.*?\.layers\.\d+)\.")


# --------------------------------------------------------------------------------------------------
# Environment helpers
# --------------------------------------------------------------------------------------------------


def cpu_has_fast_bf16() -> bool:
    """True when this CPU computes bf16 matmuls natively (AVX512-BF16 or AMX tiles)."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # older torch: be conservative
        return False


def resolve_precision(requested: str, use_cuda: bool) -> bool:
    """Whether to train in bf16 for `trainer.dtype=requested`; warns when bf16 falls back to fp32."""
    if requested != "bfloat16":
        return False
    if use_cuda:
        ok = torch.cuda.is_bf16_supported()
        where = "this GPU"
    else:
        ok = cpu_has_fast_bf16()
        where = f"this CPU ({torch.backends.cpu.get_cpu_capability()}, no AVX512-BF16/AMX)"
    if not ok:
        log.warning("trainer.dtype=bfloat16 but %s has no fast bf16: training in float32", where)
    return ok


def free_port() -> int:
    """A TCP port that was free a moment ago (for the process group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def node_ip() -> str:
    """This node's address as other nodes see it: Ray's node IP inside a Ray worker, else the
    address of the outgoing interface (127.0.0.1 when there is no network)."""
    try:
        import ray

        if ray.is_initialized():
            return str(ray.util.get_node_ip_address())
    except ImportError:
        pass
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # no packet is sent; picks the outgoing interface
            return str(s.getsockname()[0])
    except OSError:
        return "127.0.0.1"


def _disable_shm_comm_op() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory comm op (~47 s on CPU).

    `build_shm_op` returns None when the op is marked incompatible; the op only serves
    `inference_all_reduce`, which training never calls, and gloo does the actual collectives.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def deepspeed_config(
    cfg: TrainerConfig, bf16: bool, stage: int | None = None, train: bool = True
) -> dict[str, Any]:
    """The DeepSpeed config for one engine (no "optimizer"/"scheduler" blocks: see module docstring)."""
    stage = cfg.zero_stage if stage is None else stage
    zero: dict[str, Any] = {"stage": stage}
    if stage == 1:
        # managed_gradient_accumulation=false supports overlap_comm only with stages 2/3.
        zero["overlap_comm"] = False
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if train:
        ds.update(
            {
                "managed_gradient_accumulation": False,
                # ZeRO-0 in fp32 hands the step to the torch optimizer, and DeepSpeed then neither
                # reports the gradient norm nor returns it from its clip: `_record_grad_norm` clips
                # and records instead.
                "gradient_clipping": 0.0 if _plain_torch_step(stage, bf16) else float(cfg.grad_clip),
                "zero_allow_untested_optimizer": True,
            }
        )
    return ds


def _plain_torch_step(stage: int, bf16: bool) -> bool:
    """True when DeepSpeed steps the client optimizer directly (no ZeRO or bf16 wrapper)."""
    return stage == 0 and not bf16


def _record_grad_norm(engine: Any, grad_clip: float) -> None:
    """For `_plain_torch_step` engines: clip the (already all-reduced) gradients right before the
    optimizer step and keep the pre-clip global norm in `engine.slime_grad_norm`."""
    opt = engine.optimizer
    real_step = opt.step

    def step(*args: Any, **kwargs: Any) -> Any:
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        max_norm = grad_clip if grad_clip > 0 else math.inf
        engine.slime_grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        return real_step(*args, **kwargs)

    opt.step = step


def _no_dropout(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


def _adamw(model: nn.Module, lr: float, cfg: TrainerConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm weights and biases are not decayed)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, betas=(float(cfg.betas[0]), float(cfg.betas[1])), eps=1e-8)


class ValueModel(nn.Module):
    """PPO critic: the policy's transformer body with a scalar head instead of the LM head.

    forward(input_ids [B, L], attention_mask [B, L]) -> values [B, L-1], aligned with predicted
    tokens: values[:, t] is V of the state after tokens <= t, i.e. before the action token t+1.
    The head starts at zero, so initial values are 0.
    """

    def __init__(self, model_dir: str) -> None:
        super().__init__()
        from transformers import AutoModel

        self.body = AutoModel.from_pretrained(model_dir, dtype=torch.float32)
        hidden = self.body.config.hidden_size
        self.head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        h = self.body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return self.head(h[:, :-1]).squeeze(-1).float()  # [B, L-1]


@dataclass
class _Work:
    """One micro-batch and what the no-grad pass and the advantage computation attach to it.
    All per-token tensors are [B, T] (T = L-1-start, see trainer.batching) on the engine's device."""

    mb: MicroBatch
    prox: Tensor | None = None  # proximal logprobs (None: take them from the training forward)
    ref: Tensor | None = None  # reference-model logprobs
    old_values: Tensor | None = None  # critic values before the update
    adv: Tensor | None = None  # per-token advantages
    returns: Tensor | None = None  # value targets (GAE)


class _Metrics:
    """Accumulates token-weighted means, maxima and minima on one rank; `reduce` makes them global."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.weights: dict[str, float] = {}
        self.maxes: dict[str, float] = {}
        self.mins: dict[str, float] = {}

    def mean(self, key: str, value: float, weight: float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + float(value) * weight
        self.weights[key] = self.weights.get(key, 0.0) + weight

    def max(self, key: str, value: float) -> None:
        self.maxes[key] = max(self.maxes.get(key, -math.inf), float(value))

    def min(self, key: str, value: float) -> None:
        self.mins[key] = min(self.mins.get(key, math.inf), float(value))

    def reduce(self, device: torch.device, world_size: int) -> dict[str, float]:
        """Global values: every rank must call this with the same keys (they do: same code path)."""
        import torch.distributed as dist

        out: dict[str, float] = {}
        keys = sorted(self.sums)
        if keys:
            t = torch.tensor(
                [[self.sums[k], self.weights[k]] for k in keys], dtype=torch.float64, device=device
            )
            if world_size > 1:
                dist.all_reduce(t)
            for k, (s, w) in zip(keys, t.tolist(), strict=True):
                out[k] = s / w if w > 0 else 0.0
        for table, op, empty in (
            (self.maxes, dist.ReduceOp.MAX, -math.inf),
            (self.mins, dist.ReduceOp.MIN, math.inf),
        ):
            keys = sorted(table)
            if not keys:
                continue
            t = torch.tensor([table[k] for k in keys], dtype=torch.float64, device=device)
            if world_size > 1:
                dist.all_reduce(t, op=op)
            for k, v in zip(keys, t.tolist(), strict=True):
                out[k] = 0.0 if v == empty else v
        return out


# --------------------------------------------------------------------------------------------------
# The worker
# --------------------------------------------------------------------------------------------------


class TrainerWorker:
    """One data-parallel trainer rank.

    Construction is cheap (no DeepSpeed, no process group); `setup()` joins the process group and
    builds the engines. `max_response_len` is the generated-token limit used by DAPO overlong
    shaping (required when algo_cfg.overlong_buffer > 0) and as the seq_sum_norm constant.
    `temperature` is the rollout's sampling temperature: every logprob, entropy and KL term is of
    softmax(logits / temperature), the policy the engine sampled from and reported logprobs for.
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        master_addr: str,
        master_port: int,
        model_dir: str,
        model_cfg: ModelConfig,
        trainer_cfg: TrainerConfig,
        algo_cfg: AlgorithmConfig,
        seed: int,
        max_response_len: int = 0,
        temperature: float = 1.0,
    ) -> None:
        if temperature <= 0:
            raise ValueError(
                f"the sampling temperature must be > 0 to train on its logprobs, got {temperature}"
            )
        self.rank = rank
        self.world_size = world_size
        self.master_addr = master_addr
        self.master_port = master_port
        self.model_dir = model_dir
        self.model_cfg = model_cfg
        self.cfg = trainer_cfg
        self.algo = algo_cfg
        self.seed = seed
        self.max_response_len = max_response_len
        self.temperature = temperature  # the rollout's: logprobs are of softmax(logits / temperature)
        self.step = 0  # train steps done (batches), drives the LR warm-up
        self.optimizer_steps = 0
        self.engine: Any = None
        self.ref: Any = None  # frozen reference model (a module, or a ZeRO-3 engine)
        self.critic: Any = None  # critic DeepSpeed engine (PPO)
        self.bf16 = False
        self.setup_s = 0.0
        # Thread budget first: two busy processes on two cores with torch's default thread count
        # run 5-50x slower (STACK.md). OMP reads the variable when its pool starts, so set both.
        os.environ["OMP_NUM_THREADS"] = str(trainer_cfg.threads_per_rank)
        os.environ["MKL_NUM_THREADS"] = str(trainer_cfg.threads_per_rank)
        torch.set_num_threads(trainer_cfg.threads_per_rank)

    # -- lifecycle --------------------------------------------------------------------------------
    def node_address(self) -> tuple[str, int]:
        """(this node's IP, a free port): rank 0's answer becomes the process group's rendezvous."""
        return node_ip(), free_port()

    def setup(self, master_addr: str | None = None, master_port: int | None = None) -> dict[str, Any]:
        """Join the process group and build the policy engine (plus reference model and critic when
        the algorithm needs them). Returns facts for the log: precision, parameters, seconds."""
        t0 = time.perf_counter()
        if master_addr is not None:
            self.master_addr = master_addr
        if master_port is not None:
            self.master_port = master_port
        if self.algo.overlong_buffer > 0 and self.max_response_len <= 0:
            raise ValueError(
                "algorithm.overlong_buffer > 0 needs max_response_len (the generated-token limit)"
            )
        if self.cfg.expert_parallel_size != 1:
            raise ValueError(
                "trainer.expert_parallel_size != 1 is not supported for transformers MoE models: "
                "ZeRO (stage 2/3) shards the experts instead"
            )
        use_cuda = torch.cuda.is_available() and self.cfg.gpus_per_rank > 0
        if not use_cuda:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        os.environ.update(
            {
                "RANK": str(self.rank),
                # Ray gives each rank its own visible GPU(s), so the local device is always 0 there.
                "LOCAL_RANK": "0" if use_cuda else str(self.rank),
                "WORLD_SIZE": str(self.world_size),
                "MASTER_ADDR": self.master_addr,
                "MASTER_PORT": str(self.master_port),
            }
        )
        import deepspeed
        import torch.distributed as dist
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not use_cuda:
            _disable_shm_comm_op()
        if not dist.is_initialized():
            deepspeed.init_distributed(
                dist_backend="nccl" if use_cuda else "gloo",
                auto_mpi_discovery=False,
                rank=self.rank,
                world_size=self.world_size,
            )
        elif dist.get_world_size() != self.world_size:
            raise RuntimeError(
                f"a process group of size {dist.get_world_size()} already exists; this rank expects {self.world_size}"
            )
        else:
            deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo", auto_mpi_discovery=False)

        from slime.models import resolve_dtype

        self.bf16 = resolve_precision(resolve_dtype(self.cfg.dtype), use_cuda)
        self.compute_dtype = torch.bfloat16 if self.bf16 else torch.float32
        self.export_dtype = _DTYPES[resolve_dtype(self.model_cfg.dtype)]
        tok = AutoTokenizer.from_pretrained(self.model_dir)
        self.pad_id = int(tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0))

        torch.manual_seed(self.seed)
        # Built normally (not under deepspeed.zero.Init, which skips transformers' weight init) in
        # fp32: the fp32 master weights start exactly from the checkpoint; DeepSpeed casts the
        # module to bf16 when bf16 is on.
        model = AutoModelForCausalLM.from_pretrained(
            self.model_dir, dtype=torch.float32, trust_remote_code=self.model_cfg.trust_remote_code
        )
        model.config.use_cache = False
        _no_dropout(model)
        if self.cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.num_params = sum(p.numel() for p in model.parameters())
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=_adamw(model, self.cfg.lr, self.cfg),
            config=deepspeed_config(self.cfg, self.bf16),
        )
        if _plain_torch_step(self.cfg.zero_stage, self.bf16):
            _record_grad_norm(self.engine, self.cfg.grad_clip)
        self.engine.train()
        self.device = self.engine.device

        if self.algo.kl_coef > 0:
            ref = AutoModelForCausalLM.from_pretrained(
                self.model_dir, dtype=torch.float32, trust_remote_code=self.model_cfg.trust_remote_code
            )
            ref.config.use_cache = False
            _no_dropout(ref)
            ref.requires_grad_(False)
            if self.cfg.zero_stage == 3:
                # Partition the frozen copy too, so ZeRO-3 keeps its memory promise for both models.
                self.ref, _, _, _ = deepspeed.initialize(
                    model=ref, config=deepspeed_config(self.cfg, self.bf16, stage=3, train=False)
                )
            else:
                self.ref = ref.to(device=self.device, dtype=self.compute_dtype)
            self.ref.eval()

        if self.algo.advantage == "gae":
            torch.manual_seed(self.seed)
            critic = ValueModel(self.model_dir)
            _no_dropout(critic)
            if self.cfg.gradient_checkpointing:
                critic.body.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False}
                )
            self.critic, _, _, _ = deepspeed.initialize(
                model=critic,
                optimizer=_adamw(critic, self.algo.critic_lr, self.cfg),
                config=deepspeed_config(self.cfg, self.bf16),
            )
            if _plain_torch_step(self.cfg.zero_stage, self.bf16):
                _record_grad_norm(self.critic, self.cfg.grad_clip)
            self.critic.train()
        self.setup_s = time.perf_counter() - t0
        return {
            "rank": self.rank,
            "bf16": self.bf16,
            "zero_stage": self.cfg.zero_stage,
            "num_params": self.num_params,
            "reference": self.ref is not None,
            "critic": self.critic is not None,
            "setup_s": self.setup_s,
        }

    def ping(self) -> dict[str, Any]:
        """Health check: cheap, no collectives."""
        return {"rank": self.rank, "pid": os.getpid(), "ready": self.engine is not None, "step": self.step}

    def close(self) -> None:
        """Release the engines (the process group stays: it is per process)."""
        for eng in (self.engine, self.critic, self.ref):
            if eng is not None and hasattr(eng, "destroy"):
                eng.destroy()
        self.engine = self.critic = self.ref = None

    # -- collectives ------------------------------------------------------------------------------
    def _all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        if self.world_size == 1:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
        return t.tolist()

    def _all_gather_object(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    # -- forward helpers --------------------------------------------------------------------------
    def _to_device(self, mb: MicroBatch) -> MicroBatch:
        if self.device.type == "cpu":
            return mb
        for name in ("input_ids", "attention_mask", "loss_mask", "behavior_logprobs", "versions"):
            setattr(mb, name, getattr(mb, name).to(self.device, non_blocking=True))
        return mb

    def _logits(self, model: Any, mb: MicroBatch) -> Tensor:
        """Logits of the micro-batch's kept prediction columns: [B, T, V], T = L-1-start (a view).

        `logits_to_keep` makes the model apply its head to the last L-start positions only, so the
        vocabulary-sized work skips the trimmed prompt columns; the last position predicts past the
        end and is dropped. With `trainer.share_prefix`, the P = `mb.shared_prefix` leading tokens
        that every row shares run once as a [1, P] forward whose cache (kept in the autograd graph,
        so the prefix still gets its gradient) is repeated for the B rows' [B, L-P] suffix forward:
        on agentic prompts (a long system prompt and tool list) that is most of the tokens.
        """
        b, length = mb.input_ids.shape
        # Not under ZeRO-3: its per-parameter gradient hooks reduce a parameter once per forward that
        # used it, and the two forwards of one micro-step broke that (an assertion in stage3.py on MoE).
        p = mb.shared_prefix if self.cfg.share_prefix and not self._zero3 else 0
        if p < 1 or b < 2:
            out = model(
                input_ids=mb.input_ids,
                attention_mask=mb.attention_mask,
                use_cache=False,
                logits_to_keep=mb.logits_to_keep,
            )
            return out.logits[:, :-1]
        head = model(input_ids=mb.input_ids[:1, :p], use_cache=True, logits_to_keep=1)
        cache = head.past_key_values
        cache.batch_repeat_interleave(b)  # [1, H, P, D] -> [B, H, P, D] per layer, differentiable
        positions = torch.arange(p, length, device=mb.input_ids.device).expand(b, -1)  # [B, L-P]
        out = model(
            input_ids=mb.input_ids[:, p:],
            attention_mask=mb.attention_mask,  # [B, L]: the cached prefix plus the suffix
            past_key_values=cache,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=mb.logits_to_keep,  # <= L-P because P <= start
        )
        return out.logits[:, :-1]

    def _values(self, mb: MicroBatch) -> Tensor:
        """Critic values of the kept prediction columns: [B, T] float32."""
        return self.critic(mb.input_ids, mb.attention_mask)[:, mb.start :].float()

    def _logprobs(self, model: Any, mb: MicroBatch) -> Tensor:
        from trainer.losses import token_logprobs_from_logits

        return token_logprobs_from_logits(self._logits(model, mb), mb.targets, self.temperature)  # [B, T]

    # -- the step ---------------------------------------------------------------------------------
    def _lr(self) -> float:
        if self.cfg.warmup_steps > 0:
            return self.cfg.lr * min(1.0, (self.step + 1) / self.cfg.warmup_steps)
        return self.cfg.lr

    def _plan(self, refs: list[SeqRef]) -> list[list[_Work]]:
        """Minibatches of micro-batches; every rank gets the same number of micro-batches in each
        minibatch (one all-reduce for all of them)."""
        gen = None
        if self.algo.num_minibatches > 1:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step)
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
        local = [float(num_micro_batches(len(m), self.cfg.micro_batch_size)) for m in minis]
        counts = [int(c) for c in self._all_reduce(local, "max")]
        plan = []
        for mini, n in zip(minis, counts, strict=True):
            mbs = make_micro_batches(mini, n, self.pad_id, max_len=self.max_positions, filler=refs[0])
            plan.append([_Work(mb=self._to_device(mb)) for mb in mbs])
        return plan

    @torch.no_grad()
    def _no_grad_pass(self, plan: list[list[_Work]], need_prox: bool) -> None:
        """Proximal logprobs (current weights), reference logprobs and critic values, before any update."""
        for mini in plan:
            for w in mini:
                if need_prox:
                    w.prox = self._logprobs(self.engine, w.mb).float()
                if self.ref is not None:
                    w.ref = self._logprobs(self.ref, w.mb).float()
                if self.critic is not None:
                    w.old_values = self._values(w.mb).detach()

    def _sequence_rewards(self, refs: list[SeqRef], plan: list[list[_Work]]) -> Tensor:
        """Per-sequence rewards [N_local] after overlong shaping and (kl_mode=reward) the KL penalty."""
        from trainer.advantages import overlong_shaping
        from trainer.losses import kl_estimate

        rewards = torch.tensor([r.traj.reward for r in refs], dtype=torch.float32)
        if self.algo.overlong_buffer > 0:
            lengths = torch.tensor([r.traj.num_generated for r in refs], dtype=torch.int64)
            rewards = rewards + overlong_shaping(
                lengths, self.max_response_len, self.algo.overlong_buffer, self.algo.overlong_penalty
            )
        if self.algo.kl_coef > 0 and self.algo.kl_mode == "reward" and self.algo.advantage != "gae":
            # Sequence-level estimators see one number per trajectory: the summed per-token KL.
            for mini in plan:
                for w in mini:
                    if w.mb.dummy:
                        continue
                    kl = kl_estimate(w.prox, w.ref, self.algo.kl_estimator) * w.mb.loss_mask  # [B, T]
                    rewards[w.mb.seq_index] -= self.algo.kl_coef * kl.sum(dim=-1).cpu()
        return rewards

    def _sequence_advantages(self, groups: list[Group], rewards: Tensor) -> Tensor:
        """Advantages [N_local] from the rewards of the *global* batch (all ranks' groups), so
        batch-level normalisation (REINFORCE++) is the same for any number of ranks."""
        from trainer.advantages import sequence_advantages

        sizes = [len(g.trajectories) for g in groups]
        local = [rewards[sum(sizes[:i]) : sum(sizes[: i + 1])].tolist() for i in range(len(groups))]
        gathered = self._all_gather_object(local)
        all_groups = [g for rank_groups in gathered for g in rank_groups]
        offset = sum(len(rank_groups) for rank_groups in gathered[: self.rank])
        # sequence_advantages wants [G, n]; groups of unequal size are computed per size (a batch
        # statistic such as REINFORCE++'s std is then per size bucket).
        adv_groups: list[Tensor | None] = [None] * len(all_groups)
        by_size: dict[int, list[int]] = {}
        for i, g in enumerate(all_groups):
            by_size.setdefault(len(g), []).append(i)
        for idx in by_size.values():
            adv = sequence_advantages(
                torch.tensor([all_groups[i] for i in idx], dtype=torch.float32), self.algo
            )
            for row, i in enumerate(idx):
                adv_groups[i] = adv[row]
        mine = adv_groups[offset : offset + len(groups)]
        return torch.cat([a for a in mine if a is not None]) if mine else torch.zeros(0)

    def _gae(self, plan: list[list[_Work]], rewards: Tensor) -> None:
        """Token-level advantages and returns from the critic; with `normalize_adv_std` the
        advantages are whitened (mean 0, std 1) over the generated tokens of the global batch."""
        from trainer.advantages import gae
        from trainer.losses import kl_estimate

        s = ss = n = 0.0
        for mini in plan:
            for w in mini:
                mask = w.mb.loss_mask
                token_rewards = torch.zeros_like(mask)  # [B, T]
                if not w.mb.dummy:
                    # Outcome reward on each sequence's last generated token.
                    pos = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
                    last = torch.where(mask > 0, pos, -1).amax(dim=1)  # [B]
                    has = last >= 0
                    seq_r = rewards[w.mb.seq_index].to(mask.device)
                    token_rewards[has.nonzero().squeeze(-1), last[has]] = seq_r[has]
                if self.algo.kl_coef > 0 and self.algo.kl_mode == "reward":
                    token_rewards = (
                        token_rewards
                        - self.algo.kl_coef * kl_estimate(w.prox, w.ref, self.algo.kl_estimator) * mask
                    )
                w.adv, w.returns = gae(token_rewards, w.old_values, mask, self.algo.gamma, self.algo.lam)
                s += float((w.adv * mask).sum())
                ss += float((w.adv.square() * mask).sum())
                n += float(mask.sum())
        if not self.algo.normalize_adv_std:
            return
        s, ss, n = self._all_reduce([s, ss, n])
        mean = s / max(n, 1.0)
        var = max(ss / max(n, 1.0) - mean * mean, 0.0) * (n / max(n - 1.0, 1.0))
        scale = 1.0 / math.sqrt(var + 1e-8)
        for mini in plan:
            for w in mini:
                w.adv = (w.adv - mean) * scale * w.mb.loss_mask

    def _units(self, mb: MicroBatch) -> float:
        """This micro-batch's count of the aggregation's units: loss tokens (token_mean) or
        sequences with at least one loss token (seq_mean, seq_sum_norm); 0 for a dummy."""
        if mb.dummy:
            return 0.0
        if self.algo.loss_agg == "token_mean":
            return float(mb.loss_mask.sum())
        return float((mb.loss_mask.sum(dim=-1) > 0).sum())

    def _micro_step(
        self, w: _Work, weight: float, value_weight: float, loss_norm: float, m: _Metrics
    ) -> float:
        """Forward and backward of one micro-batch; returns its (unweighted) policy loss."""
        from trainer.losses import (
            aggregate,
            entropy_from_logits,
            kl_estimate,
            policy_loss,
            token_logprobs_from_logits,
            value_loss,
        )

        algo, mb = self.algo, w.mb
        n_tok = float(mb.loss_mask.sum())
        logits = self._logits(self.engine, mb)  # [B, T, V]
        lp = token_logprobs_from_logits(logits, mb.targets, self.temperature)  # [B, T] float32
        if w.prox is None:
            # Single update per batch: the proximal policy is the current one (same weights).
            w.prox = lp.detach()
            m.mean(
                "mismatch/logprob_abs", _masked_abs_mean(mb.behavior_logprobs, w.prox, mb.loss_mask), n_tok
            )
        loss, pm = policy_loss(lp, w.prox, mb.behavior_logprobs, w.adv, mb.loss_mask, algo, loss_norm)
        total = loss
        if algo.entropy_coef > 0:
            ent = entropy_from_logits(logits, self.temperature)  # [B, T], with grad for the bonus
            total = total - algo.entropy_coef * aggregate(ent, mb.loss_mask, algo.loss_agg, loss_norm)
        else:
            with torch.no_grad():
                ent = entropy_from_logits(logits.detach(), self.temperature)
        if w.ref is not None:
            kl_tok = kl_estimate(lp, w.ref, algo.kl_estimator)  # [B, T]
            if algo.kl_mode == "loss":
                kl_loss = aggregate(kl_tok, mb.loss_mask, algo.loss_agg, loss_norm)
                total = total + algo.kl_coef * kl_loss
                # Weighted by the micro-batch's share: the reduced mean is the global KL loss per step.
                m.mean("loss/kl", float(kl_loss.detach()), weight)
            m.mean("kl", _masked_mean(kl_tok, mb.loss_mask), n_tok)
        self.engine.backward(total * (weight * self.world_size))
        m.mean("entropy", _masked_mean(ent, mb.loss_mask), n_tok)
        for key in _MEAN_KEYS:
            m.mean(key, float(pm[key]), n_tok)
        # Always registered (the reduce needs the same keys on every rank); a micro-batch without
        # loss tokens contributes the neutral element.
        for key in ("is_ratio/max", "policy_ratio/max"):
            m.max(key, float(pm[key]) if n_tok > 0 else -math.inf)
        for key in ("is_ratio/min", "policy_ratio/min"):
            m.min(key, float(pm[key]) if n_tok > 0 else math.inf)
        if self.critic is not None:
            values = self._values(mb)  # [B, T]
            vl = value_loss(values, w.old_values, w.returns, mb.loss_mask, algo.value_clip)
            self.critic.backward(vl * (value_weight * self.world_size))
            m.mean("loss/value", float(vl.detach()), n_tok)
            m.mean("value/mean", _masked_mean(values, mb.loss_mask), n_tok)
        return float(loss.detach())

    def train_step(self, groups: list[Group], version: int) -> dict[str, float]:
        """One batch (this rank's shard of whole groups): advantages, then ppo_epochs x
        num_minibatches optimizer steps. Returns metrics reduced over all ranks (the same on every
        rank); `loss/policy` is the global minibatch loss averaged over the optimizer steps."""
        from trainer.advantages import broadcast_to_tokens

        if self.engine is None:
            raise RuntimeError("TrainerWorker.setup() must run before train_step()")
        if not groups:
            raise ValueError(f"trainer rank {self.rank} got no groups (batch_groups must be >= num_ranks)")
        t0 = time.perf_counter()
        algo = self.algo
        lr = self._lr()
        for g in self.engine.optimizer.param_groups:
            g["lr"] = lr
        refs = flatten_groups(groups)
        plan = self._plan(refs)
        works = [w for mini in plan for w in mini]
        updates = algo.ppo_epochs * algo.num_minibatches
        need_prox = updates > 1 or (algo.kl_coef > 0 and algo.kl_mode == "reward")
        m = _Metrics()
        if need_prox or self.ref is not None or self.critic is not None:
            self._no_grad_pass(plan, need_prox)
            if need_prox:
                for w in works:
                    n_tok = float(w.mb.loss_mask.sum())
                    m.mean(
                        "mismatch/logprob_abs",
                        _masked_abs_mean(w.mb.behavior_logprobs, w.prox, w.mb.loss_mask),
                        n_tok,
                    )

        # Advantages.
        rewards = self._sequence_rewards(refs, plan)
        if algo.advantage == "gae":
            self._gae(plan, rewards)
        else:
            seq_adv = self._sequence_advantages(groups, rewards)  # [N_local]
            for w in works:
                w.adv = broadcast_to_tokens(seq_adv[w.mb.seq_index].to(self.device), w.mb.loss_mask)
        a_s = sum(float((w.adv * w.mb.loss_mask).sum()) for w in works)
        a_ss = sum(float((w.adv.square() * w.mb.loss_mask).sum()) for w in works)
        tokens = sum(float(w.mb.num_tokens) for w in works)
        seqs = sum(0.0 if w.mb.dummy else float(w.mb.input_ids.shape[0]) for w in works)
        widest = max(w.mb.input_ids.shape[1] - 1 for w in works)  # untrimmed predicted length
        # One all-reduce for the per-minibatch normalisers and the batch totals.
        n_mini = len(plan)
        sums = self._all_reduce(
            [sum(self._units(w.mb) for w in mini) for mini in plan]
            + [sum(float(w.mb.loss_mask.sum()) for w in mini) for mini in plan]
            + [a_s, a_ss, tokens, seqs]
        )
        totals, tok_totals = sums[:n_mini], sums[n_mini : 2 * n_mini]
        a_s, a_ss, tokens, seqs = sums[2 * n_mini :]
        a_n = sum(tok_totals)
        loss_norm = float(self.max_response_len or self._all_reduce([float(widest)], "max")[0])

        grad_norms: list[float] = []
        critic_norms: list[float] = []
        for _ in range(algo.ppo_epochs):
            for mini, total, tok_total in zip(plan, totals, tok_totals, strict=True):
                share = 0.0  # this rank's share of the global minibatch loss
                for w in mini:
                    weight = self._units(w.mb) / max(total, 1.0)
                    value_weight = float(w.mb.loss_mask.sum()) / max(tok_total, 1.0)
                    share += weight * self._micro_step(w, weight, value_weight, loss_norm, m)
                self.engine.step()
                self.optimizer_steps += 1
                grad_norms.append(_grad_norm(self.engine))
                if self.critic is not None:
                    self.critic.step()
                    critic_norms.append(_grad_norm(self.critic))
                # The reduce divides by (ranks x steps), so scaling each rank's share by the world
                # size yields the global minibatch loss averaged over the optimizer steps.
                m.mean("loss/policy", share * self.world_size, 1.0)
        metrics = m.reduce(self.device, self.world_size)
        self.step += 1
        train_s = self._all_reduce([time.perf_counter() - t0], "max")[0]
        mean_adv = a_s / max(a_n, 1.0)
        metrics.update(
            {
                "adv/mean": mean_adv,
                # Unbiased, like the whitening: a whitened batch reports exactly 1.
                "adv/std": math.sqrt(max(a_ss - a_n * mean_adv * mean_adv, 0.0) / max(a_n - 1.0, 1.0)),
                "grad_norm": sum(grad_norms) / len(grad_norms),
                "lr": lr,
                "time/train_s": train_s,
                "perf/train_tokens_per_s": tokens / max(train_s, 1e-9),
                "train/tokens": tokens,
                "train/loss_tokens": a_n,
                "train/sequences": seqs,
                "train/optimizer_steps": float(updates),
                "train/version": float(version),
            }
        )
        if critic_norms:
            metrics["critic/grad_norm"] = sum(critic_norms) / len(critic_norms)
        return metrics

    # -- weights and checkpoints ------------------------------------------------------------------
    @property
    def _zero3(self) -> bool:
        return self.cfg.zero_stage == 3

    def _full_named_tensors(self, dtype: torch.dtype) -> Any:
        """Yield (checkpoint name, full CPU tensor in `dtype`) for the policy, one layer at a time.

        Every rank must exhaust this generator under ZeRO-3 (gathering is collective); other stages
        read their local full copies. Parameters are grouped by decoder layer and converted to the
        checkpoint layout per group (`slime.weights.to_checkpoint_format`: tied weights dropped, fused
        MoE experts split back per expert), so peak extra memory is one layer.
        """
        import deepspeed

        from slime.weights import to_checkpoint_format

        module = self.engine.module
        persistent = set()
        for mod_name, mod in module.named_modules():
            for b_name, buf in mod._buffers.items():
                if buf is not None and b_name not in mod._non_persistent_buffers_set:
                    persistent.add(f"{mod_name}.{b_name}" if mod_name else b_name)
        entries: list[tuple[str, Tensor]] = list(module.named_parameters())
        entries += [(n, b) for n, b in module.named_buffers() if n in persistent]
        for _, group in _layer_groups(entries):
            params = [t for _, t in group if isinstance(t, nn.Parameter)]
            ctx = (
                deepspeed.zero.GatheredParameters(params, modifier_rank=None)
                if self._zero3
                else nullcontext()
            )
            with ctx:
                full = {n: t.detach().to(device="cpu", dtype=dtype) for n, t in group}
            yield from to_checkpoint_format(module, full).items()

    def export_weights(self, version: int, out_dir: str, bucket_mb: int) -> WeightManifest | None:
        """Write the full policy weights (checkpoint names, `model.dtype`) as versioned buckets.

        All ranks call this; rank 0 writes and returns the manifest, the others return None.
        """
        from slime.weights import write_weights

        t0 = time.perf_counter()
        tensors = self._full_named_tensors(self.export_dtype)
        manifest = None
        if self.rank == 0:
            manifest = write_weights(tensors, version, out_dir, bucket_mb, dtype=self.export_dtype)
        elif self._zero3:
            for _ in tensors:  # take part in the collective gathers
                pass
        self.last_export_s = time.perf_counter() - t0
        return manifest

    def save_checkpoint(self, ckpt_dir: str, step: int, version: int) -> str:
        """DeepSpeed state on every rank, then (rank 0) a transformers export in `<ckpt_dir>/hf` and
        the completion marker. Returns ckpt_dir. All ranks call this."""
        import torch.distributed as dist

        from slime import checkpoint as ck

        os.makedirs(ckpt_dir, exist_ok=True)
        state = {"step": int(step), "version": int(version), "train_steps": self.step}
        self.engine.save_checkpoint(ckpt_dir, tag=ck.DS_TAG, client_state=state, save_latest=False)
        if self.critic is not None:
            self.critic.save_checkpoint(
                os.path.join(ckpt_dir, ck.CRITIC_DIR), tag=ck.DS_TAG, client_state=state, save_latest=False
            )
        tensors = self._full_named_tensors(self.export_dtype)
        if self.rank == 0:
            ck.write_hf_checkpoint(
                tensors,
                self.engine.module.config,
                self.model_dir,
                os.path.join(ckpt_dir, ck.HF_DIR),
                dtype=self.export_dtype,
            )
        elif self._zero3:
            for _ in tensors:
                pass
        if self.world_size > 1:
            dist.barrier()  # every rank's DeepSpeed files are on disk before the marker says complete
        if self.rank == 0:
            ck.write_state(ckpt_dir, step, version, model=self.model_cfg.name, zero_stage=self.cfg.zero_stage)
        return ckpt_dir

    def load_checkpoint(self, ckpt_dir: str) -> tuple[int, int]:
        """Restore weights, optimizer state and step counters from a checkpoint written by
        `save_checkpoint` (or the latest complete one under a directory of checkpoints).
        Returns (step, version). All ranks call this."""
        from slime import checkpoint as ck

        path = ck.resolve_checkpoint(ckpt_dir)
        state = ck.read_state(path)
        loaded, client = self.engine.load_checkpoint(path, tag=ck.DS_TAG)
        if loaded is None:
            raise FileNotFoundError(f"{path}: DeepSpeed could not load tag {ck.DS_TAG!r}")
        if self.critic is not None:
            self.critic.load_checkpoint(os.path.join(path, ck.CRITIC_DIR), tag=ck.DS_TAG)
        self.step = int((client or {}).get("train_steps", state["step"]))
        return int(state["step"]), int(state["version"])


_MEAN_KEYS = (
    "clip_frac",
    "clip_frac/low",
    "clip_frac/high",
    "is_ratio/mean",
    "policy_ratio/mean",
    "is_weight/mean",
    "is_truncated_frac",
    "masked_frac",
    "approx_kl",
)


def _masked_mean(x: Tensor, mask: Tensor) -> float:
    """Mean of x over mask != 0 (0.0 when empty), detached, as a Python float."""
    m = mask != 0
    return float(torch.where(m, x.detach().float(), 0.0).sum() / m.sum().clamp(min=1))


def _masked_abs_mean(a: Tensor, b: Tensor, mask: Tensor) -> float:
    """Mean |a - b| over mask != 0 (0.0 when empty)."""
    m = mask != 0
    return float(torch.where(m, (a.float() - b.float()).abs(), 0.0).sum() / m.sum().clamp(min=1))


def _layer_groups(entries: list[tuple[str, Tensor]]) -> list[tuple[str, list[tuple[str, Tensor]]]]:
    """Group consecutive (name, tensor) entries by decoder layer (`...layers.N.`); other entries
    (embeddings, final norm, head) form a group each."""
    groups: list[tuple[str, list[tuple[str, Tensor]]]] = []
    for name, t in entries:
        match = _LAYER.match(name)
        key = match.group(1) if match else name
        if groups and groups[-1][0] == key:
            groups[-1][1].append((name, t))
        else:
            groups.append((key, [(name, t)]))
    return groups


def _grad_norm(engine: Any) -> float:
    """The global gradient norm of the last step (before clipping), as DeepSpeed computed it."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        return float(getattr(engine, "slime_grad_norm", math.nan))
    return float(norm.item() if isinstance(norm, Tensor) else norm)
