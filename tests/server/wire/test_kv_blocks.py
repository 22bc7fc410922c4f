"""KV blocks cross a real ZeroMQ socket bit-exact; wrong sizes, shapes and dtypes are refused."""

from __future__ import annotations

import pytest
import torch
import zmq

from baton.server.kv_cache import allocate_kv_cache
from baton.server.wire import codec
from baton.server.wire import messages as m
from baton.server.wire.kv_blocks import block_frames, frames_checksum, layout_of, write_blocks


def cache(dtype, seed=0):
    c = allocate_kv_cache(8, 2, 16, 2, 8, dtype, "cpu")
    c.copy_(torch.randn(c.shape, generator=torch.Generator().manual_seed(seed)).to(dtype))
    return c


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_blocks_cross_a_socket_bit_exact(dtype):
    src, dst = cache(dtype, 0), cache(dtype, 1)
    frames = block_frames(src, [6, 2, 3])
    chunk = m.KVChunk(
        "r",
        0,
        3,
        list(src.shape[1:]),
        layout_of(src).dtype,
        sum(f.nbytes for f in frames),
        frames_checksum(frames),
    )
    ctx = zmq.Context()
    rx, tx = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    try:
        port = rx.bind_to_random_port("tcp://127.0.0.1")
        tx.connect(f"tcp://127.0.0.1:{port}")
        tx.send_multipart(codec.encode(chunk, frames), copy=False)
        got = rx.recv_multipart(copy=False)
    finally:
        rx.close(0), tx.close(0), ctx.term()
    msg, payload = codec.decode(got[1:])
    assert frames_checksum(payload) == msg.checksum
    write_blocks(dst, [0, 1, 7], payload, msg.block_shape, msg.dtype)
    for a, b in ((6, 0), (2, 1), (3, 7)):
        assert torch.equal(src[a].view(torch.uint8), dst[b].view(torch.uint8))


def test_checksum_sees_a_flipped_byte():
    frames = block_frames(cache(torch.float32), [1])
    corrupt = bytearray(frames[0])
    corrupt[100] ^= 1
    assert frames_checksum([corrupt]) != frames_checksum(frames)


def test_write_refuses_what_does_not_fit():
    src = cache(torch.float32)
    frames = block_frames(src, [1, 2])
    shape = list(src.shape[1:])
    with pytest.raises(ValueError, match="dtype"):
        write_blocks(src, [0, 1], frames, shape, "float16")
    with pytest.raises(ValueError, match="shape"):
        write_blocks(src, [0, 1], frames, [1, *shape[1:]], "float32")
    with pytest.raises(ValueError, match="bytes"):
        write_blocks(src, [0, 1], [frames[0], bytes(frames[1])[:-4]], shape, "float32")
    with pytest.raises(ValueError, match="outside"):
        write_blocks(src, [0, 99], frames, shape, "float32")
