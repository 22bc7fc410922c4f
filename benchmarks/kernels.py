"""Kernel benchmarks on one GPU: the device's own ceilings first, then each kernel against torch's
best in the same run, each as a fraction of those ceilings.

- ceilings: a 1 GiB device-to-device copy (read + write bytes / time) and an 8192^3 bf16 matmul;
- prefill: the extend kernel with an empty prefix vs SDPA's flash backend, causal, bf16, d=128,
  32 query / 8 KV heads, at 1k, 4k and 16k tokens (TFLOP/s, causal FLOPs);
- decode: paged split-KV decode vs SDPA on padded contiguous KV and FlexAttention with a paged
  block mask, batch 1..256, context 1k..32k (bytes of K, V and Q read / time);
- step: one decode step of a Llama-3-8B-shaped dummy model (CUDA graphs on) at batch 1, 64, 256
  against the floor (weight bytes + KV bytes) / copy bandwidth.

Needs only torch, triton and transformers (no HTTP or ZeroMQ parts).

    python benchmarks/kernels.py                       # everything, results/kernels_<gpu>.json
    python benchmarks/kernels.py --sections decode --batches 64 --contexts 4096
"""

from __future__ import annotations

import argparse
import re
from functools import partial

import torch
import torch.nn.functional as F
from common import save_result

sdpa = F.scaled_dot_product_attention

DTYPE = torch.bfloat16
H, HKV, D, BLOCK = 32, 8, 128, 16
MAX_KV_BYTES = 24 << 30  # skip decode shapes whose KV (or its padded copy) would not fit


def bench(fn, rotate: list | None = None) -> float:
    """Median seconds of fn(*args) over fresh argument sets (rotated so none sits in L2)."""
    import triton.testing

    sets = rotate or [()]
    i = [0]

    def call():
        fn(*sets[i[0] % len(sets)])
        i[0] += 1

    return triton.testing.do_bench(call, warmup=25, rep=100, return_mode="median") / 1e3


# ---- ceilings ------------------------------------------------------------------------------------


def ceilings() -> dict:
    n = 1 << 30
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t_copy = bench(lambda: dst.copy_(src))
    a = torch.randn(8192, 8192, dtype=DTYPE, device="cuda")
    b = torch.randn(8192, 8192, dtype=DTYPE, device="cuda")
    t_mm = bench(lambda: a @ b)
    out = {"copy_gbps": 2 * n / t_copy / 1e9, "matmul_tflops": 2 * 8192**3 / t_mm / 1e12}
    print(f"ceilings: copy {out['copy_gbps']:.0f} GB/s, matmul {out['matmul_tflops']:.0f} TF/s")
    return out


# ---- prefill -------------------------------------------------------------------------------------


def prefill(args, ceil: dict) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from baton.kernels.extend_attention import extend_attention

    rows = []
    for n in args.prefill_lens:
        q = torch.randn(n, H, D, dtype=DTYPE, device="cuda")
        k = torch.randn(n, HKV, D, dtype=DTYPE, device="cuda")
        v = torch.randn(n, HKV, D, dtype=DTYPE, device="cuda")
        cache = torch.zeros(1, 2, BLOCK, HKV, D, dtype=DTYPE, device="cuda")  # no prefix
        tables = torch.zeros(1, 1, dtype=torch.int32, device="cuda")
        qsl = torch.tensor([0, n], dtype=torch.int32, device="cuda")
        lens = torch.tensor([n], dtype=torch.int32, device="cuda")
        out = torch.empty_like(q)
        scale = D**-0.5
        t_ours = bench(
            partial(
                extend_attention,
                *(q, k, v, cache[:, 0], cache[:, 1], tables, qsl, lens, n, scale),
                out=out,
            )
        )
        # SDPA's flash backend wants equal head counts: K/V expanded once, outside the timing.
        qq = q.transpose(0, 1)[None]
        kk = k.repeat_interleave(H // HKV, 1).transpose(0, 1)[None].contiguous()
        vv = v.repeat_interleave(H // HKV, 1).transpose(0, 1)[None].contiguous()
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            t_sdpa = bench(partial(sdpa, qq, kk, vv, is_causal=True, scale=scale))
        flops = 4 * n * n * H * D / 2  # QK^T and PV, half of the square under the causal mask
        row = {
            "tokens": n,
            "ours_tflops": flops / t_ours / 1e12,
            "sdpa_flash_tflops": flops / t_sdpa / 1e12,
            "ours_ms": t_ours * 1e3,
            "sdpa_flash_ms": t_sdpa * 1e3,
        }
        row["vs_sdpa"] = row["ours_tflops"] / row["sdpa_flash_tflops"]
        row["of_matmul_ceiling"] = row["ours_tflops"] / ceil["matmul_tflops"]
        print(
            f"prefill {n:>6}: ours {row['ours_tflops']:.0f} TF/s, "
            f"flash SDPA {row['sdpa_flash_tflops']:.0f} TF/s ({row['vs_sdpa']:.2f}x)"
        )
        rows.append(row)
    return rows


# ---- decode --------------------------------------------------------------------------------------


def paged_inputs(b: int, ctx: int, gen: torch.Generator):
    """A scattered paged cache holding b sequences of ctx tokens (one layer, K and V)."""
    nblk = b * (-(-ctx // BLOCK))
    cache = torch.randn(nblk, 2, BLOCK, HKV, D, dtype=DTYPE, device="cuda")
    perm = torch.randperm(nblk, generator=gen).to("cuda", torch.int32)
    tables = perm.view(b, -1)
    lens = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(b, H, D, dtype=DTYPE, device="cuda")
    return q, cache, tables, lens


def flex_paged(q, cache, tables, lens):
    """FlexAttention over the whole paged cache as one KV sequence, with a block mask that lets
    each query see only its own pages (so whole foreign pages are skipped)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    b, nblk = q.shape[0], cache.shape[0]
    owner = torch.empty(nblk, dtype=torch.int64, device="cuda")
    page_pos = torch.empty(nblk, dtype=torch.int64, device="cuda")
    owner[tables.flatten().long()] = torch.arange(b, device="cuda").repeat_interleave(
        tables.shape[1]
    )
    page_pos[tables.flatten().long()] = torch.arange(tables.shape[1], device="cuda").repeat(b)
    lens64 = lens.long()

    def mask(bi, h, qi, kv):
        page = kv // BLOCK
        return (owner[page] == bi) & (page_pos[page] * BLOCK + kv % BLOCK < lens64[bi])

    total = nblk * BLOCK
    bm = create_block_mask(mask, b, None, 1, total, device="cuda", BLOCK_SIZE=(1, BLOCK * 8))
    k = cache[:, 0].reshape(1, total, HKV, D).transpose(1, 2).expand(b, -1, -1, -1)
    v = cache[:, 1].reshape(1, total, HKV, D).transpose(1, 2).expand(b, -1, -1, -1)
    qq = q[:, :, None, :]
    fn = torch.compile(flex_attention, dynamic=False)
    return lambda: fn(qq, k, v, block_mask=bm, enable_gqa=True)


def paged_decode(q, cache, tables, lens, scale):
    from baton.kernels.decode_attention import decode_attention

    return decode_attention(q, cache[:, 0], cache[:, 1], tables, lens, scale)


def decode(args, ceil: dict) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for b in args.batches:
        for ctx in args.contexts:
            kv_bytes = 2 * b * ctx * HKV * D * DTYPE.itemsize
            if kv_bytes > MAX_KV_BYTES:
                continue
            nbytes = kv_bytes + b * H * D * DTYPE.itemsize
            # Rotate inputs so the measured reads come from HBM, not L2 (50 MB on an H100).
            sets = [paged_inputs(b, ctx, gen) for _ in range(2 if kv_bytes > 256 << 20 else 4)]
            row = {"batch": b, "context": ctx, "bytes": nbytes}
            scale = D**-0.5
            t = bench(
                partial(paged_decode, scale=scale),
                rotate=sets,
            )
            row["ours_gbps"] = nbytes / t / 1e9
            if 2 * kv_bytes <= MAX_KV_BYTES:  # SDPA on padded contiguous KV (copied once)
                q, cache, tables, lens = sets[0]
                kk = cache[tables.long(), 0].reshape(b, -1, HKV, D).transpose(1, 2).contiguous()
                vv = cache[tables.long(), 1].reshape(b, -1, HKV, D).transpose(1, 2).contiguous()
                qq = q[:, :, None, :]
                t = bench(partial(sdpa, qq, kk, vv, scale=scale, enable_gqa=True))
                row["sdpa_padded_gbps"] = nbytes / t / 1e9
                del kk, vv
            try:
                t = bench(flex_paged(*sets[0]))
                row["flex_paged_gbps"] = nbytes / t / 1e9
            except Exception as e:  # a torch without FlexAttention, or one that refuses the mask
                row["flex_paged_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            row["ours_of_copy"] = row["ours_gbps"] / ceil["copy_gbps"]
            others = {k: v for k, v in row.items() if k.endswith("_gbps") and k != "ours_gbps"}
            print(
                f"decode b={b:>3} ctx={ctx:>5}: ours {row['ours_gbps']:.0f} GB/s "
                f"({row['ours_of_copy']:.0%} of copy)"
                + "".join(f", {k[:-5]} {v:.0f}" for k, v in others.items())
            )
            rows.append(row)
            del sets
            torch.cuda.empty_cache()
    return rows


# ---- one decode step of an 8B-shaped model ------------------------------------------------------


def step(args, ceil: dict) -> list[dict]:
    from baton import SamplingParams
    from baton.server.config import EngineConfig
    from baton.server.engine import LLMEngine

    rows = []
    for b in args.step_batches:
        eng = LLMEngine(
            EngineConfig(
                model=args.step_model,
                load_format="dummy",
                dtype="bfloat16",
                device="cuda",
                max_num_seqs=max(args.step_batches),
                max_num_batched_tokens=16384,
                gpu_memory_utilization=0.9,
                show_progress=False,
                detokenize=False,
            )
        )
        params = SamplingParams(max_tokens=1 << 20, temperature=0, ignore_eos=True)
        gen = torch.Generator().manual_seed(b)
        for i in range(b):
            prompt = torch.randint(100, 20000, (args.step_context,), generator=gen).tolist()
            eng.add_request(f"r{i}", prompt, params)
        while any(s.is_prefill for s in eng.batcher.live_seqs) or eng.batcher.num_waiting:
            eng.step()
        for _ in range(3):
            eng.step()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        n = 20
        start.record()
        for _ in range(n):
            eng.step()
        end.record()
        torch.cuda.synchronize()
        t = start.elapsed_time(end) / 1e3 / n
        weights = sum(p.numel() * p.element_size() for p in eng.runner.model.parameters())
        mc = eng.runner.kv_cache
        per_token = mc[0].numel() * mc.element_size() // BLOCK  # every layer's K and V
        ctx = args.step_context + 4 + n // 2
        floor = (weights + b * ctx * per_token) / (ceil["copy_gbps"] * 1e9)
        row = {
            "batch": b,
            "context": args.step_context,
            "step_ms": t * 1e3,
            "floor_ms": floor * 1e3,
            "vs_floor": t / floor,
            "tokens_per_s": b / t,
        }
        print(
            f"step b={b:>3}: {row['step_ms']:.2f} ms, floor {row['floor_ms']:.2f} ms "
            f"({row['vs_floor']:.2f}x), {row['tokens_per_s']:.0f} tok/s"
        )
        rows.append(row)
        del eng
        torch.cuda.empty_cache()
    return rows


SECTIONS = {"prefill": prefill, "decode": decode, "step": step}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    p.add_argument("--prefill-lens", nargs="+", type=int, default=[1024, 4096, 16384])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64, 256])
    p.add_argument("--contexts", nargs="+", type=int, default=[1024, 4096, 16384, 32768])
    p.add_argument("--step-batches", nargs="+", type=int, default=[1, 64, 256])
    p.add_argument("--step-context", type=int, default=1024)
    p.add_argument("--step-model", default="llama-3-8b", help="a shipped config, loaded dummy")
    p.add_argument("--output", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/kernels.py measures a GPU; this machine has none")
    torch.manual_seed(0)
    ceil = ceilings()
    results = {"ceilings": ceil}
    for name in args.sections:
        results[name] = SECTIONS[name](args, ceil)
    gpu = re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name().lower()).strip("_")
    out = save_result(f"kernels_{gpu}", {"args": vars(args), **results}, args.output)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
