"""Run the suite here as an AVX2-only CI machine runs it: `dtype: auto` resolves to float32.

    PYTHONPATH=tests/as_avx2:. .venv/bin/python -m pytest -q tests/test_e2e.py

Python imports `sitecustomize` at start-up from the path; this one hides the CPU's native bf16 from
torch's probes, which `slime.core.model.has_native_bf16` asks (docs/testing.md).
"""

import contextlib

with contextlib.suppress(ImportError):
    import torch.cpu as _cpu

    _all_capabilities = _cpu.get_capabilities
    _cpu._is_avx512_bf16_supported = lambda: False
    _cpu._is_amx_tile_supported = lambda: False
    _cpu.get_capabilities = lambda: {k: v for k, v in _all_capabilities().items() if k != "bf16"}
