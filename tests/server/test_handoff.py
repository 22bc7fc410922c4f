"""Disaggregation inside one process: a prefill engine hands its prompt KV to a decode engine,
and the greedy output equals one engine doing both."""

from __future__ import annotations

import pytest

from baton import SamplingParams
from baton.server.config import EngineConfig
from baton.server.engine import LLMEngine

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
PROMPTS = [[5 + (i * 7 + j) % 200 for j in range(n)] for i, n in enumerate([3, 16, 17, 40, 70])]


def engine(tiny_config_dir, **kw):
    cfg = EngineConfig(
        model=tiny_config_dir, load_format="dummy", seed=0, show_progress=False, **kw
    )
    return LLMEngine(cfg)


def run_alone(eng, rid, prompt, params):
    eng.add_request(rid, prompt, params)
    tokens = []
    while eng.has_unfinished_requests():
        for out in eng.step():
            tokens = out.outputs[0].token_ids
    return tokens


def hand_over(p, d, rid, prompt, params, chunk=None):
    """Prefill on `p`, copy the blocks to `d` (as the wire would), decode there."""
    p.add_request(rid, prompt, params, handoff=True)
    dst = d.reserve_prefilled(rid, prompt, params)
    assert dst is not None
    shipped = 0
    h = None
    while h is None:
        outs = p.step()
        progress = p.handoffs.progress(rid)
        if progress is not None:  # ship complete blocks early, as the worker does
            src, ready = progress
            for b in range(shipped, ready):
                d.runner.kv_cache[dst[b]] = p.runner.kv_cache[src[b]]
            shipped = ready
        h = p.handoffs.outgoing(rid).handoff
    assert outs[0].outputs[0].token_ids == [h.first_token] and not outs[0].finished
    assert len(h.block_ids) == len(dst)
    for b in range(shipped, len(dst)):
        d.runner.kv_cache[dst[b]] = p.runner.kv_cache[h.block_ids[b]]
    assert p.batcher.block_manager.num_used_blocks > 0  # held until the receiver acks
    assert p.handoffs.pop(rid)
    assert p.batcher.block_manager.num_used_blocks == 0
    assert d.commit_prefilled(rid, h.first_token, h.first_logprobs) is None
    tokens = [h.first_token]
    while d.has_unfinished_requests():
        for out in d.step():
            tokens = out.outputs[0].token_ids
    assert d.batcher.block_manager.num_used_blocks == 0
    return tokens


@pytest.mark.parametrize("budget", [2048, 16])  # whole prompts, and chunked prefill
def test_handoff_equals_colocated(tiny_config_dir, budget):
    both = engine(tiny_config_dir)
    p = engine(tiny_config_dir, max_num_batched_tokens=budget)
    d = engine(tiny_config_dir)
    for i, prompt in enumerate(PROMPTS):
        want = run_alone(both, f"r{i}", prompt, GREEDY)
        assert hand_over(p, d, f"r{i}", prompt, GREEDY) == want


def test_seeded_sampling_continues_the_same_stream_after_the_handoff(tiny_config_dir):
    both, p, d = engine(tiny_config_dir), engine(tiny_config_dir), engine(tiny_config_dir)
    streams = set()
    for seed in (1, 2, 3):
        params = SamplingParams(max_tokens=12, temperature=1.5, seed=seed, ignore_eos=True)
        want = run_alone(both, f"s{seed}", PROMPTS[3], params)
        assert hand_over(p, d, f"s{seed}", PROMPTS[3], params) == want
        streams.add(tuple(want))
    assert len(streams) == 3  # sampled, not greedy: each seed its own stream


def test_first_token_that_ends_the_request_is_not_handed_off(tiny_config_dir):
    p = engine(tiny_config_dir)
    p.add_request("a", PROMPTS[1], SamplingParams(max_tokens=1, temperature=0), handoff=True)
    outs = p.step()
    assert outs[0].finished and outs[0].outputs[0].finish_reason == "length"
    assert p.handoffs.outgoing("a").handoff is None
    assert p.batcher.block_manager.num_used_blocks == 0


def test_abort_releases_reservations_and_handoffs(tiny_config_dir):
    p, d = engine(tiny_config_dir), engine(tiny_config_dir)
    assert d.reserve_prefilled("a", PROMPTS[3], GREEDY)
    assert d.batcher.block_manager.num_used_blocks == 3
    d.abort_request("a")
    assert d.batcher.block_manager.num_used_blocks == 0
    p.add_request("a", PROMPTS[3], GREEDY, handoff=True)
    p.step()
    assert p.handoffs.outgoing("a").handoff.request_id == "a"
    p.abort_request("a")
    assert p.batcher.block_manager.num_used_blocks == 0
    assert not p.has_unfinished_requests()


def test_reserve_refuses_what_cannot_fit(tiny_config_dir):
    d = engine(tiny_config_dir, num_kv_blocks=4)
    with pytest.raises(ValueError, match="blocks"):
        d.reserve_prefilled("big", list(range(3, 100)), GREEDY)
    assert d.reserve_prefilled("a", PROMPTS[3], GREEDY)  # 3 of 4 blocks
    assert d.reserve_prefilled("b", PROMPTS[3], GREEDY) is None  # not now: nothing held
    assert d.batcher.block_manager.num_used_blocks == 3
