"""Ahead-of-time compilation of a `Launch` for a GPU that need not be present.

Triton's compiler runs on any machine: this lowers the launch's kernel, with its constexprs and
compile options, to PTX and a cubin for a target compute capability, then reads what the
binary needs: shared memory (Triton does not refuse a kernel that overflows it: the driver
would, on first launch), registers and spilled bytes (from `cuobjdump`, which ships with
Triton). Run it without TRITON_INTERPRET: interpreted kernels cannot be compiled.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass

import torch

from baton.kernels.launch import Launch, arg_names, shared_memory_limit, unspecialized

# A spill under this many bytes per thread is a few registers moved to L1 around a loop;
# beyond it the kernel is memory-bound on its own locals.
MAX_SPILL_BYTES = 0


@dataclass(frozen=True)
class Compiled:
    """What one compiled variant needs from the GPU, and whether that fits."""

    kernel: str
    arch: tuple[int, int]
    constexprs: dict
    num_warps: int
    num_stages: int
    shared: int  # bytes of shared memory per block
    shared_limit: int
    registers: int | None  # per thread; None when cuobjdump is unavailable
    spill_bytes: int | None  # local memory per thread (spilled registers)
    seconds: float

    @property
    def problems(self) -> list[str]:
        out = []
        if self.shared > self.shared_limit:
            out.append(f"needs {self.shared} bytes of shared memory, over {self.shared_limit}")
        if self.spill_bytes is not None and self.spill_bytes > MAX_SPILL_BYTES:
            out.append(f"spills {self.spill_bytes} bytes per thread to local memory")
        return out

    def describe(self) -> str:
        consts = ", ".join(f"{k}={v}" for k, v in self.constexprs.items())
        return (
            f"{self.kernel} sm_{self.arch[0]}{self.arch[1]} [{consts}] warps={self.num_warps} "
            f"stages={self.num_stages}: shared {self.shared}/{self.shared_limit}, "
            f"registers {self.registers}, spill {self.spill_bytes}, {self.seconds:.1f} s"
        )


def _attrs(launch: Launch) -> dict:
    """Divisibility hints as the launcher would give them: 16-byte aligned pointers (every
    allocation is) and integers divisible by 16, except the kernel's unspecialized parameters."""
    names = arg_names(launch.kernel)
    skip = unspecialized(launch.kernel)
    attrs = {}
    for arg, name in launch.named_args():
        if name in skip or isinstance(arg, (bool, float)):
            continue
        aligned = (
            isinstance(arg, torch.Tensor) or isinstance(arg, int) and arg % 16 == 0 and arg != 0
        )
        if aligned:
            attrs[(names.index(name),)] = [["tt.divisibility", 16]]
    return attrs


def compile_launch(launch: Launch, arch: tuple[int, int]) -> Compiled:
    """Compile `launch` for sm_<arch>; raises what Triton raises for a kernel it cannot lower."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile checks need TRITON_INTERPRET unset (kernels are interpreted)")
    types = launch.signature()
    signature = {n: types.get(n, "constexpr") for n in arg_names(launch.kernel)}
    src = ASTSource(
        launch.kernel, signature, constexprs=dict(launch.constexprs), attrs=_attrs(launch)
    )
    t0 = time.perf_counter()
    compiled = triton.compile(
        src,
        target=GPUTarget("cuda", arch[0] * 10 + arch[1], 32),
        options={"num_warps": launch.num_warps, "num_stages": launch.num_stages},
    )
    seconds = time.perf_counter() - t0
    registers, spill = _resource_usage(compiled.asm["cubin"])
    return Compiled(
        kernel=launch.name,
        arch=arch,
        constexprs=dict(launch.constexprs),
        num_warps=launch.num_warps,
        num_stages=launch.num_stages,
        shared=int(compiled.metadata.shared),
        shared_limit=shared_memory_limit(arch),
        registers=registers,
        spill_bytes=spill,
        seconds=seconds,
    )


def _cuobjdump() -> str | None:
    """The cuobjdump that ships with Triton's NVIDIA backend (or one on PATH)."""
    import shutil

    import triton.backends.nvidia as nv

    candidate = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    return candidate if os.access(candidate, os.X_OK) else shutil.which("cuobjdump")


def _resource_usage(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers, local bytes) per thread of the kernel in `cubin`, from cuobjdump."""
    tool = _cuobjdump()
    if tool is None:
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    reg = re.search(r"REG:(\d+)", out)
    local = re.search(r"LOCAL:(\d+)", out)
    return (int(reg.group(1)) if reg else None), (int(local.group(1)) if local else None)
