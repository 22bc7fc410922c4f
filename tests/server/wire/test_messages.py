"""Messages hold their value invariants."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from baton.server.wire import messages as m


def test_every_message_has_a_unique_type_name_and_is_frozen_and_keyword_only():
    assert len(m.MESSAGES) == 18
    for name, cls in m.MESSAGES.items():
        assert name == cls.TYPE and dataclasses.is_dataclass(cls)
        assert cls.__dataclass_params__.frozen
        assert all(f.kw_only for f in dataclasses.fields(cls))
    for cls in (m.KVLayout, m.WorkerCPU):
        assert cls.__dataclass_params__.frozen
        assert all(f.kw_only for f in dataclasses.fields(cls))
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.Abort(request_id="r").request_id = "s"


LAYOUT = m.KVLayout(num_layers=30, block_size=16, num_kv_heads=3, head_dim=64, dtype="float32")
BLOCK = [30, 2, 16, 3, 64]
BLOCK_BYTES = 30 * 2 * 16 * 3 * 64 * 4
CHUNK = m.KVChunk(
    request_id="r",
    first_block=0,
    num_blocks=1,
    block_shape=BLOCK,
    dtype="float32",
    nbytes=BLOCK_BYTES,
    checksum=0,
)
REG = dict(
    worker_id="w",
    role="both",
    pid=1,
    host="h",
    model="x",
    layout=LAYOUT,
    kv_endpoint="e",
    max_model_len=8,
    num_blocks=8,
)
HB = dict(
    worker_id="w",
    running=0,
    waiting=0,
    kv_usage=0.0,
    num_free_blocks=0,
    prefix_queries=0,
    prefix_hits=0,
)
GEN = dict(request_id="r", prompt_token_ids=[1], params={}, decode_worker_id="", decode_endpoint="")
TOK = dict(
    request_id="r",
    worker_id="w",
    token_ids=[1],
    logprobs=None,
    finish_reason=None,
    stop_reason=None,
    num_cached_tokens=0,
)
DONE = dict(request_id="r", num_blocks=1, first_token=5, first_logprobs=None, num_cached_tokens=0)


def chunk(**changes) -> m.KVChunk:
    return dataclasses.replace(CHUNK, **changes)


def test_kv_chunk_knows_its_block_size():
    assert chunk(num_blocks=2, nbytes=2 * BLOCK_BYTES).block_nbytes == BLOCK_BYTES
    half = chunk(dtype="bfloat16", nbytes=BLOCK_BYTES // 2)
    assert half.block_nbytes == BLOCK_BYTES // 2


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: dataclasses.replace(LAYOUT, block_size=0), "block_size"),
        (lambda: dataclasses.replace(LAYOUT, dtype="float64"), "dtype"),
        (lambda: m.Register(**{**REG, "role": "router"}), "role"),
        (lambda: m.Register(**{**REG, "num_blocks": -1}), "num_blocks"),
        (lambda: m.WorkerCPU(threads=0, wait_policy="brief", cpus="0", linear=""), "threads"),
        (lambda: m.Heartbeat(**{**HB, "running": -1}), "running"),
        (lambda: m.Generate(**GEN, prior_output_ids=[-1]), "prior_output_ids"),
        (
            lambda: m.Generate(
                **{**GEN, "decode_worker_id": "d", "decode_endpoint": "tcp://d:1"},
                prior_output_ids=[2],
            ),
            "recomputed where it decodes",
        ),
        (lambda: m.Generate(**{**GEN, "prompt_token_ids": [1, -2]}), "prompt_token_ids"),
        (
            lambda: m.KVOpen(
                request_id="r",
                prefill_worker_id="p",
                prompt_token_ids=[-1],
                params={},
                layout=LAYOUT,
            ),
            "prompt_token_ids",
        ),
        (lambda: m.TokenOutput(**{**TOK, "logprobs": [[1, -0.1]]}), "logprobs"),
        (lambda: m.TokenOutput(**{**TOK, "logprobs": [[1, -0.1, [[2]]]]}), "logprobs"),
        (lambda: m.TokenOutput(**{**TOK, "logprobs": [[1, "x", []]]}), "logprobs"),
        (lambda: m.TokenOutput(**{**TOK, "num_cached_tokens": -1}), "num_cached_tokens"),
        (lambda: m.TokenOutput(**TOK, queue_time_s=-1.0), "queue_time_s"),
        (lambda: m.KVReport(request_id="r", nbytes=-1, seconds=0.1, ok=True), "nbytes"),
        (lambda: m.KVReport(request_id="r", nbytes=1, seconds=-0.1, ok=False), "seconds"),
        (lambda: chunk(first_block=-1), "first_block"),
        (lambda: chunk(num_blocks=0, nbytes=0), "num_blocks"),
        (lambda: chunk(block_shape=BLOCK[:4]), "block_shape"),
        (lambda: chunk(block_shape=[30, 3, 16, 3, 64], nbytes=1), "block_shape"),
        (lambda: chunk(dtype="int8"), "dtype"),
        (lambda: chunk(nbytes=BLOCK_BYTES - 1), "nbytes"),
        (lambda: chunk(checksum=1 << 64), "checksum"),
        (lambda: m.KVDone(**{**DONE, "first_logprobs": [5, -0.1]}), "first_logprobs"),
        (lambda: m.KVDone(**{**DONE, "first_token": -5}), "first_token"),
    ],
)
def test_messages_refuse_impossible_values(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_logprob_entries_of_the_documented_shape_are_fine():
    entry = [5, -0.25, [[5, -0.25], [9, -2]]]
    assert m.TokenOutput(**{**TOK, "token_ids": [5], "logprobs": [entry]}).logprobs == [entry]
    assert m.KVDone(**{**DONE, "first_logprobs": entry}).first_logprobs == entry


def test_a_failure_is_its_own_message_not_a_token_output():
    names = {f.name for f in dataclasses.fields(m.TokenOutput)}
    assert not names & {"error", "retry"}
    failed = m.RequestFailed(request_id="r", worker_id="w", error="draining", retry=True)
    assert failed.TYPE == "request_failed" and failed.retry
    assert "version" not in {f.name for f in dataclasses.fields(m.Register)}


def test_messages_and_codec_import_neither_torch_nor_zmq():
    code = (
        "import sys; import baton.server.wire.codec, baton.server.wire.messages; "
        "print(sorted(k for k in ('torch', 'zmq', 'numpy') if k in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
