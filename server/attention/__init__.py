"""Attention backends behind one interface, chosen by name."""

from __future__ import annotations

from baton.server.attention.base import AttentionBackend, AttentionMetadata, ForwardContext

BACKENDS = ("torch", "triton")


def default_backend_name(device_type: str) -> str:
    return "triton" if device_type == "cuda" else "torch"


def get_attention_backend(name: str | None, device_type: str) -> AttentionBackend:
    """`name` None or "auto" picks the device's default."""
    if name in (None, "auto"):
        name = default_backend_name(device_type)
    if name == "torch":
        from baton.server.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend()
    if name == "triton":
        try:
            from baton.server.attention.triton_backend import TritonAttentionBackend
        except ImportError as e:
            if device_type == "cuda":
                # NOTE: until the Triton kernels land, CUDA falls back to the reference backend.
                from baton.server.attention.torch_backend import TorchAttentionBackend

                return TorchAttentionBackend()
            raise ValueError(f"attention_backend: 'triton' is not available ({e})") from e
        return TritonAttentionBackend()
    raise ValueError(f"attention_backend: unknown backend {name!r}; choose one of {BACKENDS}")


__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "ForwardContext",
    "get_attention_backend",
    "default_backend_name",
]
