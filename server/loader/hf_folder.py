"""An HF model folder: config.json, `*.safetensors` streamed tensor by tensor, tokenizer files."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# NOTE: torch, safetensors and tqdm load lazily: the router inspects folders (config,
# tokenizer) without importing torch.

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def read_config_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {str(path)!r}: {e}") from e


def safetensors_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(
            f"model: {str(folder)!r} has no *.safetensors weights "
            f"(use load_format='dummy' for random weights)"
        )
    return files


def iter_safetensors(folder: Path, show_progress: bool = True) -> Iterator[tuple[str, Any]]:
    """Yields (name, tensor) on the host, one at a time, so peak memory stays one tensor."""
    from safetensors import safe_open
    from tqdm.auto import tqdm

    files = safetensors_files(folder)
    total = 0
    for f in files:
        with safe_open(f, framework="pt", device="cpu") as st:
            total += len(st.keys())
    with tqdm(total=total, desc="Loading weights", unit="tensor", disable=not show_progress) as bar:
        for f in files:
            with safe_open(f, framework="pt", device="cpu") as st:
                for name in st.keys():  # noqa: SIM118 - safe_open is not a mapping
                    yield name, st.get_tensor(name)
                    bar.update()


def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def tokenizer_eos_id(folder: Path) -> int | None:
    """The id of the tokenizer's EOS token, read from its JSON files as transformers reads them
    (tokenizer_config.json or special_tokens_map.json names it, tokenizer.json gives its id);
    None where they do not say. Loading the tokenizer itself costs a worker ~2.5 s of imports."""
    name = None
    for file in ("tokenizer_config.json", "special_tokens_map.json"):
        try:
            name = json.loads((folder / file).read_text()).get("eos_token")
        except (OSError, ValueError, AttributeError):
            continue
        if name is not None:
            break
    if isinstance(name, dict):
        name = name.get("content")
    if not isinstance(name, str):
        return None
    try:
        tok = json.loads((folder / "tokenizer.json").read_text())
    except (OSError, ValueError):
        return None
    for added in tok.get("added_tokens") or []:
        if isinstance(added, dict) and added.get("content") == name:
            return added.get("id")
    vocab = (tok.get("model") or {}).get("vocab")
    return vocab.get(name) if isinstance(vocab, dict) else None


def load_tokenizer(folder: Path) -> Any | None:
    """The folder's tokenizer, or None when it ships no tokenizer files."""
    if not has_tokenizer(folder):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))
