"""What a result file records about where it was measured: machine, versions, commit, command."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

from baton.server.host_cpu import cpu_model, isa_flags


def machine_info() -> dict:
    import torch

    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    info = {
        "cpu": cpu_model(),
        "cpu_flags": isa_flags(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": tf_version,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    if info["gpu"] is not None:
        try:
            info["driver"] = (
                subprocess.run(
                    ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                .stdout.split("\n")[0]
                .strip()
            )
        except (OSError, subprocess.CalledProcessError):
            info["driver"] = None
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    info["git_commit"] = _git("rev-parse", "HEAD")
    changes = _git("status", "--porcelain", "--untracked-files=no")
    info["git_dirty"] = None if changes is None else bool(changes)  # tracked files edited
    return info


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def command_line() -> str:
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
