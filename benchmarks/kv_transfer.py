"""KV handoff: its throughput over ZeroMQ, and the time to first token it adds to a served request.

Section "transfer": real KVChunk messages over ZeroMQ (ipc:// and tcp://127.0.0.1) against a
plain in-process copy of the same bytes, in the same run.

The sender is its own process, as a prefill worker is: it opens a handoff (KVOpen), and once the
receiver answers ships the blocks in chunks (block_frames + XXH3, sent zero-copy), then KVDone.
The receiver decodes every chunk, verifies its checksum and writes the blocks into its own cache
(write_blocks). The time runs on the receiver from its KVOpenReply to the last block written.
Both caches are shaped like SmolLM2's (30 layers, block 16, 3 KV heads, head_dim 64, float32).

Section "ttft": `baton serve` started once per mode (colocated, then disagg with one prefill and
one decode worker), each prompt length sent as token ids (fresh random ones per request, so no
prefix-cache hit) through the streaming completions endpoint. The client times the first and
the second token: the first leaves the prefill worker at once in both modes, the second is the
decode worker's first, after the handoff.

    python benchmarks/kv_transfer.py                  # 1 MiB .. 1 GiB, then TTFT 128 .. 4096
    python benchmarks/kv_transfer.py --max-mib 256 --transports tcp --sections transfer
    python benchmarks/kv_transfer.py --sections ttft --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import random
import statistics
import tempfile
import time
from dataclasses import dataclass

import torch
import zmq
from bench.kv_ttft import ttft_section
from common import save_result

from baton.scheduler.sampling_params import SamplingParams
from baton.server.kv_cache import allocate_kv_cache, block_bytes
from baton.server.wire import codec
from baton.server.wire import messages as m
from baton.server.wire.kv_blocks import block_frames, frames_checksum, layout_of, write_blocks
from baton.server.wire.params import params_to_dict

SIZES_MIB = [1, 4, 16, 64, 256, 1024]
GB = 1e9  # throughput in decimal GB/s


@dataclass(frozen=True)
class Shape:
    num_layers: int = 30
    block_size: int = 16
    num_kv_heads: int = 3
    head_dim: int = 64
    dtype: torch.dtype = torch.float32

    @property
    def block_bytes(self) -> int:
        return block_bytes(
            self.num_layers, self.block_size, self.num_kv_heads, self.head_dim, self.dtype
        )

    def cache(self, num_blocks: int) -> torch.Tensor:
        c = allocate_kv_cache(
            num_blocks,
            self.num_layers,
            self.block_size,
            self.num_kv_heads,
            self.head_dim,
            self.dtype,
            "cpu",
        )
        c.zero_()  # touch every page now, not inside a timed region
        return c


def fill(cache: torch.Tensor, seed: int) -> None:
    """The same bytes in every process for the same seed, so the receiver can check them."""
    cache.view(torch.int32).random_(generator=torch.Generator().manual_seed(seed))


def block_ids(n: int, total: int, seed: int) -> list[int]:
    """n scattered blocks out of `total`, as a real block table would be."""
    return random.Random(seed).sample(range(total), n)


# ---- the two ends of one handoff ---------------------------------------------------------------


def sender(endpoint: str, plan: list[int], repeats: int, chunk_blocks: int, total: int) -> None:
    """Prefill side: one DEALER, one handoff per (size, repeat), blocks from its own cache."""
    torch.set_num_threads(1)
    shape = Shape()
    cache = shape.cache(total)
    fill(cache, seed=0)
    layout = layout_of(cache)
    params = params_to_dict(SamplingParams(max_tokens=1))
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    for n in plan:
        ids = block_ids(n, total, seed=n)
        prompt = [1] * (n * shape.block_size)
        for r in range(repeats + 1):  # the first round warms the socket up, untimed
            rid = f"bench-{n}-{r}"
            opening = m.KVOpen(
                request_id=rid,
                prefill_worker_id="bench",
                prompt_token_ids=prompt,
                params=params,
                layout=layout,
            )
            sock.send_multipart(codec.encode(opening))
            reply, _ = codec.decode(sock.recv_multipart(copy=False))
            assert isinstance(reply, m.KVOpenReply) and reply.ok, reply
            for s in range(0, n, chunk_blocks):
                part = ids[s : s + chunk_blocks]
                frames = block_frames(cache, part)
                chunk = m.KVChunk(
                    request_id=rid,
                    first_block=s,
                    num_blocks=len(part),
                    block_shape=list(cache.shape[1:]),
                    dtype=layout.dtype,
                    nbytes=sum(f.nbytes for f in frames),
                    checksum=frames_checksum(frames),
                )
                sock.send_multipart(codec.encode(chunk, frames), copy=False)
            done = m.KVDone(
                request_id=rid,
                num_blocks=n,
                first_token=0,
                first_logprobs=None,
                num_cached_tokens=0,
            )
            sock.send_multipart(codec.encode(done))
            ack, _ = codec.decode(sock.recv_multipart(copy=False))
            assert isinstance(ack, m.KVAck) and ack.ok, ack
    sock.close()
    ctx.term()


def receive_one(sock: zmq.Socket, cache: torch.Tensor, dst: list[int], timeout_ms: int) -> float:
    """Decode side of one handoff; returns the seconds from KVOpenReply to the last block."""

    def recv():
        if not sock.poll(timeout_ms):
            raise TimeoutError("the sender went quiet")
        frames = sock.recv_multipart(copy=False)
        msg, payload = codec.decode(frames[1:])
        return frames[0].bytes, msg, payload

    peer, opened, _ = recv()
    assert isinstance(opened, m.KVOpen) and opened.layout == layout_of(cache), opened
    t0 = time.perf_counter()
    sock.send_multipart(
        [peer, *codec.encode(m.KVOpenReply(request_id=opened.request_id, ok=True, reason=""))]
    )
    while True:
        _, msg, payload = recv()
        if isinstance(msg, m.KVDone):
            break
        assert isinstance(msg, m.KVChunk), msg
        if frames_checksum(payload) != msg.checksum:
            raise ValueError("KV chunk checksum mismatch")
        part = dst[msg.first_block : msg.first_block + msg.num_blocks]
        write_blocks(cache, part, payload, msg.block_shape, msg.dtype)
    dt = time.perf_counter() - t0
    sock.send_multipart(
        [peer, *codec.encode(m.KVAck(request_id=opened.request_id, ok=True, reason=""))]
    )
    return dt


# ---- sections ----------------------------------------------------------------------------------


def transfer_section(args) -> dict:
    """Handoff throughput per total size: in-process copy_, in-process frames, then each socket."""
    shape = Shape()
    sizes = [s for s in SIZES_MIB if s <= args.max_mib]
    plan = [-(-(s << 20) // shape.block_bytes) for s in sizes]  # blocks per size, rounded up
    total = max(plan)
    src, dst_cache = shape.cache(total), shape.cache(total)
    fill(src, seed=0)  # the sender's bytes, to check what arrived
    rows = {
        n: {"size_mib": s, "blocks": n, "bytes": n * shape.block_bytes}
        for s, n in zip(sizes, plan, strict=True)
    }

    for n in plan:  # baselines, no socket
        rows[n]["copy"] = timed(args.repeats, lambda n=n: dst_cache[:n].copy_(src[:n]))
        rows[n]["frames_in_process"] = timed(
            args.repeats, lambda n=n: frames_in_process(src, dst_cache, n, total, args.chunk_blocks)
        )

    for transport in args.transports:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        with tempfile.TemporaryDirectory() as tmp:
            if transport == "ipc":
                endpoint = f"ipc://{tmp}/kv.sock"
                sock.bind(endpoint)
            else:
                endpoint = f"tcp://127.0.0.1:{sock.bind_to_random_port('tcp://127.0.0.1')}"
            proc = mp.get_context("spawn").Process(
                target=sender, args=(endpoint, plan, args.repeats, args.chunk_blocks, total)
            )
            proc.start()
            try:
                for n in plan:
                    ids, dst = block_ids(n, total, seed=n), block_ids(n, total, seed=n + 1)
                    dst_cache[dst] = 0  # what the check below sees must come from this socket
                    times = [
                        receive_one(sock, dst_cache, dst, timeout_ms=120_000)
                        for _ in range(args.repeats + 1)
                    ][1:]  # the first handoff warms up, untimed
                    check_arrived(src, ids, dst_cache, dst, transport)
                    rows[n][transport] = summary(times)
            except BaseException:
                proc.kill()
                raise
            finally:
                proc.join(timeout=60)
                sock.close()
                ctx.term()
        if proc.exitcode != 0:
            raise RuntimeError(f"the {transport} sender exited with {proc.exitcode}")

    methods = ["copy", "frames_in_process", *args.transports]
    for row in rows.values():
        for k in methods:
            row[k]["gbps"] = row["bytes"] / row[k]["median_s"] / GB
    print_table(list(rows.values()), methods)
    return {"block_bytes": shape.block_bytes, "shape": repr(shape), "rows": list(rows.values())}


def check_arrived(src, ids: list[int], dst_cache, dst: list[int], transport: str) -> None:
    for s in range(0, len(ids), 64):
        a, b = src[ids[s : s + 64]], dst_cache[dst[s : s + 64]]
        if not torch.equal(a.view(torch.int32), b.view(torch.int32)):  # bits: NaN != NaN
            raise AssertionError(f"{transport}: blocks {s}.. arrived changed")


def frames_in_process(src, dst_cache, n: int, total: int, chunk_blocks: int) -> None:
    """Everything a handoff does but the socket: frames, checksum both ends, codec, write_blocks."""
    ids, dst = block_ids(n, total, seed=n), block_ids(n, total, seed=n + 1)
    for s in range(0, n, chunk_blocks):
        frames = block_frames(src, ids[s : s + chunk_blocks])
        chunk = m.KVChunk(
            request_id="bench",
            first_block=s,
            num_blocks=len(frames),
            block_shape=list(src.shape[1:]),
            dtype=layout_of(src).dtype,
            nbytes=sum(f.nbytes for f in frames),
            checksum=frames_checksum(frames),
        )
        msg, payload = codec.decode(codec.encode(chunk, frames))
        if frames_checksum(payload) != msg.checksum:
            raise ValueError("KV chunk checksum mismatch")
        write_blocks(dst_cache, dst[s : s + len(frames)], payload, msg.block_shape, msg.dtype)


def timed(repeats: int, fn) -> dict:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return summary(times)


def summary(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times}


def print_table(rows: list[dict], methods: list[str]) -> None:
    print("\nKV handoff throughput, GB/s (1e9 bytes/s), median of repeats")
    head = f"{'size':>9} {'blocks':>7}" + "".join(f" {k:>18}" for k in methods)
    print(head)
    print("-" * len(head))
    for r in rows:
        size = f"{r['bytes'] / 2**20:.1f} MiB"
        cells = "".join(f" {r[k]['gbps']:>18.2f}" for k in methods)
        print(f"{size:>9} {r['blocks']:>7}{cells}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--max-mib", type=int, default=1024, help="largest total size (MiB)")
    p.add_argument("--transports", nargs="+", default=["ipc", "tcp"], choices=["ipc", "tcp"])
    p.add_argument("--chunk-blocks", type=int, default=64, help="blocks per KVChunk message")
    p.add_argument("--repeats", type=int, default=5, help="timed handoffs per size (median)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the receiver")
    p.add_argument("--output", default=None, help="result file (default: results/kv_transfer.json)")
    p.add_argument("--sections", nargs="+", default=["transfer", "ttft"], choices=SECTIONS)
    p.add_argument("--prompt-lens", nargs="+", type=int, default=[128, 512, 1024, 2048, 4096])
    p.add_argument("--model", default="smollm2", help="ttft: the model `baton serve` loads")
    p.add_argument("--device", default="cpu", help="ttft: the workers' device")
    p.add_argument("--dtype", default="float32", help="ttft: the workers' dtype")
    p.add_argument("--kv-cache-gib", type=float, default=1.0, help="ttft: KV cache per worker")
    args = p.parse_args()
    # NOTE: one thread by default: copies of single blocks gain nothing from more, and idle
    # OpenMP workers spinning after each copy starve ZeroMQ's I/O threads on small machines.
    torch.set_num_threads(args.threads)

    results = {name: SECTIONS[name](args) for name in args.sections}

    out = save_result("kv_transfer", {"args": vars(args), **results}, args.output)
    print(f"\nsaved {out}")


SECTIONS = {"transfer": transfer_section, "ttft": ttft_section}

if __name__ == "__main__":
    main()
