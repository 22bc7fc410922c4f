"""The model's architecture, parsed once from an HF `config.json` dict (transformers 4.x or 5.x)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_ROPE_FIELDS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    # NOTE: sorted (key, value) pairs holding "rope_type" and its fields, so the config stays
    # hashable; None means plain RoPE. Read it through `rope_scaling_dict`.
    rope_scaling: tuple[tuple[str, Any], ...] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # bias on q/k/v only (Qwen2)
    model_type: str
    architectures: tuple[str, ...] = ()
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(_unsupported(self.model_type))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"config: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"config: head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    @property
    def rope_type(self) -> str:
        return "default" if self.rope_scaling is None else dict(self.rope_scaling)["rope_type"]

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(_unsupported(model_type))
        for key in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        ):
            if d.get(key) is None:
                raise ValueError(f"config: {model_type!r} config lacks {key!r}")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config: hidden_act {d['hidden_act']!r} is not supported (silu)")
        if model_type != "qwen2" and (d.get("attention_bias") or d.get("mlp_bias")):
            raise ValueError(f"config: attention_bias/mlp_bias are not supported for {model_type}")
        heads = d["num_attention_heads"]
        max_pos = d.get("max_position_embeddings", 2048)
        _check_sliding_window(d, model_type, max_pos)
        rope_theta, rope_scaling = _parse_rope(d)
        eos = d.get("eos_token_id")
        eos_ids = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=model_type == "qwen2",
            model_type=model_type,
            architectures=tuple(d.get("architectures") or ()),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=tuple(int(e) for e in eos_ids),
            pad_token_id=d.get("pad_token_id"),
        )


def _unsupported(model_type: Any) -> str:
    return (
        f"config: model_type {model_type!r} is not supported; "
        f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
    )


def _check_sliding_window(d: dict[str, Any], model_type: str, max_pos: int) -> None:
    window = d.get("sliding_window")
    if model_type == "llama" or window is None or window >= max_pos:
        return
    if model_type == "qwen2" and not d.get("use_sliding_window", False):
        return
    raise ValueError(
        f"config: sliding_window={window} (< max_position_embeddings={max_pos}) is not "
        f"supported; only full attention is"
    )


def _parse_rope(d: dict[str, Any]) -> tuple[float, tuple[tuple[str, Any], ...] | None]:
    """transformers 5.x writes `rope_parameters` (theta inside); 4.x rope_theta, rope_scaling."""
    params = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", d.get("rope_theta", 10000.0)))
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"config: rope_type {rope_type!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("config: partial_rotary_factor != 1 is not supported")
    if rope_type == "default":
        return theta, None
    fields = {k: params.get(k) for k in _ROPE_FIELDS[rope_type]}
    if rope_type == "llama3" and fields["original_max_position_embeddings"] is None:
        fields["original_max_position_embeddings"] = d.get("max_position_embeddings")
    missing = [k for k, v in fields.items() if v is None]
    if missing:
        raise ValueError(f"config: rope_type {rope_type!r} lacks {', '.join(missing)}")
    return theta, tuple(sorted({"rope_type": rope_type, **fields}.items()))
