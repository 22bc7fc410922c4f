"""What the router reads of a model: its tokenizer, chat template and context length.

A router needs no weights and no torch: an HF folder is read as it is; a GGUF is read from the
folder its first conversion writes (config and tokenizer files beside the weights), converted
in a child process when no complete one exists, so this process never imports torch.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from baton.server.loader.gguf import cache_dir_for, is_complete
from baton.server.loader.hf_folder import read_config_json
from baton.server.loader.resolve import locate
from baton.server.model_config import ModelConfig
from baton.server.router.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RouterModel:
    name: str
    max_position_embeddings: int
    tokenizer: Tokenizer


def _gguf_folder(path: Path) -> Path:
    folder = cache_dir_for(path)
    if not is_complete(folder):
        logger.info("converting %s once, in a child process", path)
        cmd = [sys.executable, "-m", "baton.server.loader.gguf", str(path)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not is_complete(folder):
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ValueError(f"model: could not convert {str(path)!r}: {tail[0]}")
    return folder


def router_model(model: str, load_format: str = "auto") -> RouterModel:
    src = locate(model, load_format)
    if src.kind == "config_file":
        raise ValueError(
            f"model: {model!r} is a bare config with no tokenizer; the router needs one"
        )
    folder = src.path if src.kind == "hf_folder" else _gguf_folder(src.path)
    try:
        config = ModelConfig.from_hf_dict(read_config_json(folder / "config.json"))
    except ValueError as e:
        raise ValueError(f"model {model!r}: {e}") from e
    return RouterModel(src.name, config.max_position_embeddings, Tokenizer(folder))
