"""One kernel launch as data: which kernel, its grid, its arguments and its compile options.

Every launcher builds a `Launch` and runs it, so the ahead-of-time compile check
(`baton.kernels.aot`) compiles exactly what would run: the same constexprs, warps and stages,
chosen by the same code, for a target GPU given by its compute capability.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

# A GPU by compute capability, e.g. (9, 0) for Hopper; None: not a GPU (the interpreter).
Arch = tuple[int, int] | None


# Shared memory one block may use (opt-in maximum), bytes, by compute capability.
SHARED_MEMORY = {(7, 5): 65536, (8, 0): 166912, (8, 6): 101376, (8, 9): 101376, (9, 0): 232448}


def shared_memory_limit(arch: tuple[int, int]) -> int:
    """The most shared memory one block may use on `arch`; for an unlisted one, that of the
    newest listed arch not newer than it (the smallest listed when none is)."""
    known = [a for a in SHARED_MEMORY if a <= arch]
    return SHARED_MEMORY[max(known)] if known else min(SHARED_MEMORY.values())


def arch_of(device: torch.device) -> Arch:
    """The compute capability of a CUDA device; None for anything else."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_capability(device)


@dataclass(frozen=True, eq=False)  # launches hold tensors: compare by `variant()`
class Launch:
    """`kernel[grid](*args, **constexprs, num_warps=..., num_stages=...)`.

    `args` are the kernel's non-constexpr arguments in order (tensors, ints, floats);
    `constexprs` its compile-time ones. Two launches with equal `variant()` run one binary.
    """

    kernel: Any  # a triton JITFunction (an interpreted one under TRITON_INTERPRET)
    grid: tuple[int, ...]
    args: tuple
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3  # Triton's default

    @property
    def name(self) -> str:
        return getattr(self.kernel, "__name__", None) or self.kernel.fn.__name__

    def variant(self) -> tuple:
        """What selects the compiled binary: the constexprs, the compile options, and the
        argument dtypes and specializations as Triton's launcher keys them (see `spec_key`)."""
        return (
            self.name,
            tuple(sorted(self.constexprs.items())),
            self.num_warps,
            self.num_stages,
            tuple(spec_key(a, n in unspecialized(self.kernel)) for a, n in self.named_args()),
        )

    def named_args(self) -> list[tuple[Any, str]]:
        names = [n for n in arg_names(self.kernel) if n not in self.constexprs]
        if len(names) != len(self.args):
            raise ValueError(
                f"{self.name}: {len(self.args)} arguments for parameters {', '.join(names)}"
            )
        return list(zip(self.args, names, strict=True))

    def signature(self) -> dict[str, str]:
        """Triton type strings of the non-constexpr arguments (`*bf16`, `i32`, `fp32`, ...)."""
        return {n: type_string(a) for a, n in self.named_args()}

    def run(self) -> None:
        if 0 in self.grid:
            return
        self.kernel[self.grid](
            *self.args, **self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages
        )


_TYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int16: "i16",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "i1",
}


def type_string(arg: Any) -> str:
    if isinstance(arg, torch.Tensor):
        return "*" + _TYPES[arg.dtype]
    if isinstance(arg, bool):
        return "i1"
    if isinstance(arg, int):
        return "i32" if -(2**31) <= arg < 2**31 else "i64"
    if isinstance(arg, float):
        return "fp32"
    raise TypeError(f"no Triton type for a kernel argument of type {type(arg).__name__}")


def spec_key(arg: Any, unspecialized: bool) -> tuple:
    """How Triton's launcher tells two calls apart beyond their types: pointers by 16-byte
    alignment, integers by divisibility by 16 and by being 1, unless the parameter is in the
    kernel's `do_not_specialize`."""
    t = type_string(arg)
    if unspecialized or isinstance(arg, (bool, float)):
        return (t,)
    if isinstance(arg, torch.Tensor):
        return (t, arg.data_ptr() % 16 == 0)
    return (t, arg % 16 == 0, arg == 1)


def arg_names(kernel: Any) -> list[str]:
    return list(kernel.arg_names)


def unspecialized(kernel: Any) -> set[str]:
    # NOTE: an interpreted kernel keeps its decorator's options in `kwargs`.
    options = getattr(kernel, "kwargs", None) or {}
    listed = getattr(kernel, "do_not_specialize", None) or options.get("do_not_specialize") or ()
    names = arg_names(kernel)
    return {names[i] if isinstance(i, int) else i for i in listed}
