"""A GGUF file, dequantized once through transformers and cached on disk as an HF folder.

Cache layout: `$BATON_CACHE_DIR/gguf/<stem>-<key>/` (default `~/.cache/baton`), the key hashing
the file's absolute path, size and mtime. A folder is built under a temporary sibling name, gets
its completion marker last, then is renamed into place; a folder without the marker is partial,
so it is removed and rebuilt.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from baton.server.config import cache_root
from baton.server.model_config import SUPPORTED_MODEL_TYPES, ModelConfig

logger = logging.getLogger(__name__)

COMPLETE_MARKER = ".baton-complete"
# GGUF `general.architecture` -> HF model_type (llama.cpp also writes Mistral as "llama").
_ARCH_TO_MODEL_TYPE = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}


def cache_dir_for(gguf_path: Path) -> Path:
    path = gguf_path.resolve()
    st = path.stat()
    key = hashlib.sha256(f"{path}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{path.stem}-{key}"


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file()


def gguf_model_type(gguf_path: Path) -> str:
    """The HF model_type of a GGUF, from its metadata alone (no tensor is read)."""
    from gguf import GGUFReader

    field = GGUFReader(str(gguf_path)).fields.get("general.architecture")
    arch = bytes(field.parts[field.data[0]]).decode() if field is not None else None
    if arch not in _ARCH_TO_MODEL_TYPE:
        raise ValueError(
            f"model: GGUF {str(gguf_path)!r} has model_type (architecture) {arch!r}, which is "
            f"not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return _ARCH_TO_MODEL_TYPE[arch]


def gguf_to_hf_folder(gguf_path: Path) -> Path:
    """The cached HF folder of a GGUF, converting it first when no complete one exists."""
    out = cache_dir_for(gguf_path)
    if is_complete(out):
        return out
    gguf_model_type(gguf_path)  # fail fast, before the slow dequantization
    if out.exists():
        logger.warning("removing the partial GGUF conversion %s", out)
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        logger.info("dequantizing %s into %s (once)", gguf_path, out)
        dequantize_to_folder(gguf_path, tmp)
        (tmp / COMPLETE_MARKER).write_text(json.dumps({"source": str(gguf_path.resolve())}))
        try:
            os.replace(tmp, out)
        except OSError:
            if not is_complete(out):  # NOTE: a concurrent process may have won the rename
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


@contextlib.contextmanager
def _parsed_once() -> Iterator[None]:
    """Within one conversion, each GGUF is parsed and gguf's tensor-name map built once.

    NOTE: transformers parses a GGUF's whole metadata on each of its three reads (config,
    weights, tokenizer), smollm2's 49,152-entry vocabulary field by field, and builds a tensor
    name map for every module it visits (397 times): 30 of a 35 s conversion. Both come from
    the `gguf` module at call time, so memoizing them there changes nothing else.
    """
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}

    def read(path, *args, **kw):
        key = (str(path), args, tuple(sorted(kw.items())))
        if key not in readers:
            readers[key] = reader(path, *args, **kw)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = read, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def dequantize_to_folder(gguf_path: Path, folder: Path) -> None:
    """Writes config.json, model.safetensors (fp32) and the tokenizer files into `folder`."""
    with _parsed_once():
        _dequantize_to_folder(gguf_path, folder)


def _dequantize_to_folder(gguf_path: Path, folder: Path) -> None:
    # NOTE: imported here: the router reads a converted folder without torch or transformers.
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = str(gguf_path.parent), gguf_path.name
    hf = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    config = ModelConfig.from_hf_dict(hf.config.to_dict())
    # NOTE: transformers refuses save_pretrained on a GGUF-loaded model, so the parts are
    # written directly, in the layout from_pretrained reads back.
    state = {
        k: v.detach().contiguous()
        for k, v in hf.state_dict().items()
        if not (config.tie_word_embeddings and k == "lm_head.weight")
    }
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    # The weights are plain fp32 now: drop the GGUF quantization_config so readers load them so.
    hf_config = json.loads(hf.config.to_json_string())
    hf_config.pop("quantization_config", None)
    hf_config["dtype"] = "float32"
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    if hf.generation_config is not None:
        hf.generation_config.save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(directory, gguf_file=name).save_pretrained(str(folder))


if __name__ == "__main__":  # the router converts in a child process: it never imports torch
    import sys

    logging.basicConfig(level=logging.INFO)
    print(gguf_to_hf_folder(Path(sys.argv[1])))
