"""Compile every kernel variant the engine launches, for GPUs this machine need not have.

    python -m baton.kernels.compile_check                   # the quick matrix, a table
    python -m baton.kernels.compile_check --matrix full --json results.json

A case is one distinct variant (kernel, constexprs, warps, stages, argument types) for one
target; the models' variants come from `variants.model_launches`, which calls the launchers'
own plan functions. Each case must compile, fit the target's shared memory and not spill.
The `quick` matrix (in `make test`): Hopper, bf16 and fp32, the three model shapes, the extend
kernel at its longest query bucket (the largest tiles: shorter buckets need less shared memory);
`full` (`make compile-check`): Hopper and Ampere, bf16, fp16 and fp32, every bucket. Both
also compile one case that must NOT fit (the fp32 Hopper tiles before they were fitted to
the dtype), so a check that stopped measuring would fail.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from importlib import resources

import torch

from baton.kernels.launch import Launch
from baton.kernels.variants import Shape, model_launches

# SmolLM2-135M (the default model) ships as a GGUF; its shape is written out here.
SMOLLM2 = Shape("smollm2", 576, 1536, 9, 3, 64)
SHIPPED = ("llama-3-8b", "qwen2.5-7b")  # head dim 128, GQA groups 4 and 7
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MATRICES = {
    "quick": {"archs": [(9, 0)], "dtypes": ["bf16", "fp32"], "extend_buckets": 1},
    "full": {"archs": [(9, 0), (8, 0)], "dtypes": ["bf16", "fp16", "fp32"], "extend_buckets": 0},
}


@dataclass(frozen=True)
class Case:
    id: str
    arch: tuple[int, int]
    launch: Launch
    expect_fit: bool = True


def shapes() -> list[Shape]:
    configs = resources.files("baton.server") / "configs"
    shipped = [
        Shape.from_hf(name, json.loads((configs / f"{name}.json").read_text())) for name in SHIPPED
    ]
    return [SMOLLM2, *shipped]


def _case_id(arch, launch: Launch) -> str:
    consts = "-".join(
        f"{k}{int(v) if isinstance(v, bool) else v}" for k, v in launch.constexprs.items()
    )
    types = launch.signature()
    dtype = next((t[1:] for t in types.values() if t in ("*bf16", "*fp16", "*fp32")), "")
    return (
        f"sm{arch[0]}{arch[1]}-{launch.name.strip('_')}-{dtype}-{consts}"
        f"-w{launch.num_warps}s{launch.num_stages}"
    )


def oversized(arch: tuple[int, int]) -> Launch:
    """The extend kernel in fp32, head dim 128, with the 2-byte-type Hopper tiles (128 x 64,
    8 warps, 3 stages): 256 KiB of shared memory against 227."""
    llama = shapes()[1]
    launch = next(
        la
        for la in model_launches(llama, torch.float32, arch)
        if la.name == "_extend_attention_kernel" and la.constexprs["BLOCK_M"] == 128
    )
    consts = {**launch.constexprs, "BLOCK_M": 128, "BLOCK_N": 64}
    return dataclasses.replace(launch, constexprs=consts, num_warps=8, num_stages=3)


def cases(matrix: str) -> list[Case]:
    """Every distinct variant of the matrix, in a stable order, plus the must-not-fit case."""
    spec = MATRICES[matrix]
    out: dict[str, Case] = {}
    for arch in spec["archs"]:
        for dtype in spec["dtypes"]:
            for shape in shapes():
                launches = model_launches(shape, DTYPES[dtype], arch)
                extend = [la for la in launches if la.name == "_extend_attention_kernel"]
                keep = extend[-spec["extend_buckets"] :] if spec["extend_buckets"] else extend
                for la in launches:
                    if la.name != "_extend_attention_kernel" or any(la is k for k in keep):
                        out.setdefault(_case_id(arch, la), Case(_case_id(arch, la), arch, la))
    bad = oversized((9, 0))
    out["must-not-fit-" + _case_id((9, 0), bad)] = Case(
        "must-not-fit-" + _case_id((9, 0), bad), (9, 0), bad, expect_fit=False
    )
    return list(out.values())


_CASES: list[Case] = []


def _init(matrix: str) -> None:
    _CASES[:] = cases(matrix)


def _compile(i: int) -> dict:
    from baton.kernels.aot import compile_launch

    case = _CASES[i]
    try:
        c = compile_launch(case.launch, case.arch)
    except Exception as e:  # a kernel Triton cannot lower for this target is a result too
        return {"id": case.id, "error": f"{type(e).__name__}: {str(e)[:2000]}"}
    return {
        "id": case.id,
        "error": None,
        "expect_fit": case.expect_fit,
        "problems": c.problems,
        "shared": c.shared,
        "shared_limit": c.shared_limit,
        "registers": c.registers,
        "spill_bytes": c.spill_bytes,
        "seconds": round(c.seconds, 2),
        "describe": c.describe(),
    }


def run(matrix: str, jobs: int) -> list[dict]:
    n = len(cases(matrix))
    if jobs <= 1:
        _init(matrix)
        return [_compile(i) for i in range(n)]
    with ProcessPoolExecutor(jobs, initializer=_init, initargs=(matrix,)) as pool:
        return list(pool.map(_compile, range(n)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--matrix", choices=list(MATRICES), default="quick")
    p.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--json", help="write every case's result here")
    args = p.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    results = run(args.matrix, args.jobs)
    bad = 0
    for r in results:
        fits = r["error"] is None and not r["problems"]
        ok = fits == r.get("expect_fit", True) and r["error"] is None
        bad += not ok
        print(("ok   " if ok else "FAIL ") + (r.get("describe") or f"{r['id']}: {r['error']}"))
    import triton

    print(f"{len(results)} variants compiled by triton {triton.__version__}, {bad} failed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"matrix": args.matrix, "triton": triton.__version__, "cases": results}, f)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
