"""Model loading: HF folders, GGUF files (converted once, cached), dummy weights from a config."""

from __future__ import annotations

from baton.server.loader.model_loader import LoadedModel, empty_model, load_model
from baton.server.loader.resolve import ResolvedModel, resolve_model

__all__ = ["LoadedModel", "ResolvedModel", "empty_model", "load_model", "resolve_model"]
