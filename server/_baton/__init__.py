"""Baton: disaggregated LLM inference. The offline API lives here.

Names are resolved lazily so that `import baton.scheduler` stays free of torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "baton.server.llm",
    "SamplingParams": "baton.scheduler.sampling_params",
    "RequestOutput": "baton.server.outputs",
    "CompletionOutput": "baton.server.outputs",
    "EngineConfig": "baton.server.config",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'baton' has no attribute {name!r}")
