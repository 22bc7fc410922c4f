"""Model loading: HF folders, GGUF files (converted once, cached), dummy weights from a config.

Names resolve lazily, so `baton.server.loader.resolve` (which the router uses to find a model's
files) imports no torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LoadedModel": "baton.server.loader.model_loader",
    "empty_model": "baton.server.loader.model_loader",
    "load_model": "baton.server.loader.model_loader",
    "ResolvedModel": "baton.server.loader.resolve",
    "resolve_model": "baton.server.loader.resolve",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'baton.server.loader' has no attribute {name!r}")
