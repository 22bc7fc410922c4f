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
        from baton.kernels.utils import interpreting

        if device_type != "cuda" and not interpreting():
            raise ValueError(
                "attention_backend: 'triton' needs a CUDA device, or TRITON_INTERPRET=1 set "
                "before start-up to run its kernels in the (slow) interpreter"
            )
        from baton.server.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend()
    raise ValueError(f"attention_backend: unknown backend {name!r}; choose one of {BACKENDS}")


__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "ForwardContext",
    "get_attention_backend",
    "default_backend_name",
]
