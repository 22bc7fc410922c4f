"""KV blocks cross a real ZeroMQ socket bit-exact; wrong sizes, shapes and dtypes are refused."""

from __future__ import annotations

import dataclasses
import tempfile

import msgpack
import pytest
import torch
import xxhash
import zmq

from baton.server.kv_cache import allocate_kv_cache
from baton.server.wire import codec
from baton.server.wire import messages as m
from baton.server.wire.kv_blocks import block_frames, frames_checksum, layout_of, write_blocks

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def cache(dtype, seed=0, num_blocks=8, device="cpu"):
    # [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
    c = allocate_kv_cache(num_blocks, 3, 4, 2, 8, dtype, device)
    g = torch.Generator().manual_seed(seed)
    # random bit patterns, NaN and inf encodings included: the transfer must not care
    raw = torch.randint(0, 256, (c.numel() * c.element_size(),), dtype=torch.uint8, generator=g)
    c.view(torch.uint8).view(-1).copy_(raw.to(device))
    return c


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def chunk_for(src, frames, first=0):
    return m.KVChunk(
        request_id="req-1",
        first_block=first,
        num_blocks=len(frames),
        block_shape=list(src.shape[1:]),
        dtype=layout_of(src).dtype,
        nbytes=sum(f.nbytes for f in frames),
        checksum=frames_checksum(frames),
    )


@pytest.fixture
def pair(request):
    """A connected DEALER (prefill side) -> ROUTER (decode side) pair."""
    ctx = zmq.Context()
    rx, tx = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    for s in (rx, tx):
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVTIMEO, 5000)  # a broken transfer fails, it does not hang
    with tempfile.TemporaryDirectory() as tmp:
        if request.param == "ipc":
            endpoint = f"ipc://{tmp}/kv.sock"
            rx.bind(endpoint)
        else:
            endpoint = f"tcp://127.0.0.1:{rx.bind_to_random_port('tcp://127.0.0.1')}"
        tx.connect(endpoint)
        yield tx, rx
        rx.close(0)
        tx.close(0)
        ctx.term()


@pytest.mark.parametrize("pair", ["ipc", "tcp"], indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_blocks_cross_a_socket_bit_exact(pair, dtype):
    tx, rx = pair
    src, dst = cache(dtype, seed=0), cache(dtype, seed=1)
    before = dst.clone()
    src_ids, dst_ids = [6, 2, 3], [0, 7, 4]
    frames = block_frames(src, src_ids)
    tx.send_multipart(codec.encode(chunk_for(src, frames), frames), copy=False)

    got = rx.recv_multipart(copy=False)
    peer, (msg, payload) = got[0].bytes, codec.decode(got[1:])
    assert isinstance(msg, m.KVChunk) and msg.num_blocks == 3
    assert frames_checksum(payload) == msg.checksum
    write_blocks(dst, dst_ids, payload, msg.block_shape, msg.dtype)
    rx.send_multipart([peer, *codec.encode(m.KVAck(request_id=msg.request_id, ok=True, reason=""))])

    ack, _ = codec.decode(tx.recv_multipart(copy=False))
    assert ack == m.KVAck(request_id="req-1", ok=True, reason="")
    for a, b in zip(src_ids, dst_ids, strict=True):
        assert same_bytes(src[a], dst[b])
    untouched = [b for b in range(dst.shape[0]) if b not in dst_ids]
    assert same_bytes(dst[untouched], before[untouched])


@pytest.mark.parametrize("pair", ["tcp"], indirect=True)
def test_a_corrupted_block_fails_the_checksum(pair):
    tx, rx = pair
    src = cache(torch.float16)
    frames = block_frames(src, [1, 5])
    chunk = chunk_for(src, frames)
    corrupt = bytearray(frames[1])
    corrupt[len(corrupt) // 2] ^= 0x10
    tx.send_multipart(codec.encode(chunk, [frames[0], corrupt]), copy=False)
    msg, payload = codec.decode(rx.recv_multipart(copy=False)[1:])
    assert msg == chunk  # the frames are well-formed: only the checksum can tell
    assert frames_checksum(payload) != msg.checksum


@pytest.mark.parametrize("pair", ["tcp"], indirect=True)
def test_wrong_sized_frames_never_decode(pair):
    tx, rx = pair
    src = cache(torch.float32)
    frames = block_frames(src, [1, 2])
    # packed by hand: encode itself refuses to send these payloads
    fields = dataclasses.asdict(chunk_for(src, frames))
    head = msgpack.packb({"t": "kv_chunk", "v": codec.PROTOCOL_VERSION, "f": fields})
    for payload in ([frames[0]], [frames[0], bytes(frames[1])[:-4]], [*frames, frames[0]]):
        tx.send_multipart([head, *payload], copy=False)
        with pytest.raises(codec.WireError, match="kv_chunk"):
            codec.decode(rx.recv_multipart(copy=False)[1:])


def test_checksum_is_xxh3_of_the_concatenation():
    frames = block_frames(cache(torch.bfloat16), [0, 3, 1])
    assert frames_checksum(frames) == xxhash.xxh3_64_intdigest(b"".join(bytes(f) for f in frames))
    assert frames_checksum([zmq.Frame(bytes(f)) for f in frames]) == frames_checksum(frames)
    assert frames_checksum(frames[::-1]) != frames_checksum(frames)  # order matters
    assert frames_checksum([]) == xxhash.xxh3_64_intdigest(b"")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_frames_are_views_of_the_cache(dtype):
    src = cache(dtype)
    frames = block_frames(src, [4, 1])
    per_block = src[0].numel() * src.element_size()
    assert [f.nbytes for f in frames] == [per_block, per_block]
    assert all(f.format == "B" and f.ndim == 1 for f in frames)
    assert bytes(frames[0]) == src[4].view(torch.uint8).numpy().tobytes()
    assert bytes(frames[1]) == src[1].view(torch.uint8).numpy().tobytes()
    src[4].zero_()  # zero-copy: the frame sees the change
    assert bytes(frames[0]) == bytes(per_block)
    assert block_frames(src, []) == []


def test_layout_of():
    c = allocate_kv_cache(5, 30, 16, 3, 64, torch.bfloat16, "cpu")
    assert layout_of(c) == m.KVLayout(
        num_layers=30, block_size=16, num_kv_heads=3, head_dim=64, dtype="bfloat16"
    )
    with pytest.raises(ValueError, match="num_blocks"):
        layout_of(c[0])
    with pytest.raises(ValueError, match="dtype"):
        layout_of(allocate_kv_cache(1, 1, 1, 1, 1, torch.float64, "cpu"))
    with pytest.raises(ValueError, match="contiguous"):
        layout_of(allocate_kv_cache(2, 1, 4, 1, 4, torch.float32, "cpu").transpose(3, 5))


def test_block_frames_refuses_bad_ids():
    src = cache(torch.float32)
    for bad in ([8], [-1], [True], [1.0]):
        with pytest.raises(ValueError, match="block"):
            block_frames(src, bad)


def test_write_refuses_what_does_not_fit_and_leaves_the_cache_alone():
    src, dst = cache(torch.float32, 0), cache(torch.float32, 1)
    before = dst.clone()
    frames = block_frames(src, [1, 2])
    shape = list(src.shape[1:])
    short = bytes(frames[1])[:-4]
    cases = [
        ([0, 1], frames, shape, "float16", "dtype"),
        ([0, 1], frames, shape, "float64", "dtype"),
        ([0, 1], frames, shape, None, "dtype"),
        ([0, 1], frames, [shape[0] + 1, *shape[1:]], "float32", "shape"),
        ([0, 1], frames, shape[1:], "float32", "shape"),
        ([0, 1], frames[:1], shape, "float32", "frames"),
        ([0], frames, shape, "float32", "frames"),
        ([0, 1], [frames[0], short], shape, "float32", "bytes"),
        ([0, 1], [frames[0], bytes(frames[1]) + b"\0"], shape, "float32", "bytes"),
        ([0, 1], [frames[0], None], shape, "float32", "buffer"),
        ([0, 99], frames, shape, "float32", "outside"),
        ([0, -1], frames, shape, "float32", "outside"),
        ([3, 3], frames, shape, "float32", "duplicate"),
        ([0, False], frames, shape, "float32", "integer"),
    ]
    for ids, fr, bshape, dtype, match in cases:
        with pytest.raises(ValueError, match=match):
            write_blocks(dst, ids, fr, bshape, dtype)
        assert same_bytes(dst, before), match  # nothing was written before the check failed


def test_write_takes_zmq_frames_and_bytearrays():
    src, dst = cache(torch.bfloat16, 0), cache(torch.bfloat16, 1)
    frames = block_frames(src, [0, 1])
    received = [zmq.Frame(bytes(frames[0])), bytearray(frames[1])]
    write_blocks(dst, [5, 6], received, list(src.shape[1:]), layout_of(src).dtype)
    assert same_bytes(dst[5:7], src[0:2])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_blocks_round_trip(dtype):
    src = cache(dtype, 0, device="cuda")
    dst = cache(dtype, 1, device="cuda")
    before = dst.clone()
    frames = block_frames(src, [7, 0, 2])
    assert frames_checksum(frames) == frames_checksum(block_frames(src.cpu(), [7, 0, 2]))
    write_blocks(dst, [1, 2, 3], frames, list(src.shape[1:]), layout_of(src).dtype)
    assert same_bytes(dst[1:4].cpu(), src[[7, 0, 2]].cpu())
    assert same_bytes(dst[4:].cpu(), before[4:].cpu()) and same_bytes(dst[0], before[0])
