"""The engine on a tiny dummy model: batching, chunking, caching and preemption keep greedy
output."""

from __future__ import annotations

import random

import pytest

from baton import LLM, SamplingParams
from baton.server.kv_cache import max_useful_blocks

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def prompts(n, seed=0, lo=3, hi=60):
    rng = random.Random(seed)
    return [[rng.randrange(3, 256) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


@pytest.fixture(scope="module")
def reference(tiny_config_dir):
    """Each prompt alone, no chunking pressure, no prefix cache: the ground truth."""
    llm = LLM(
        model=tiny_config_dir,
        load_format="dummy",
        seed=0,
        enable_prefix_caching=False,
        show_progress=False,
    )
    ps = prompts(6)
    return ps, [llm.generate([p], GREEDY)[0].token_ids for p in ps]


def make(tiny_config_dir, **kw):
    return LLM(model=tiny_config_dir, load_format="dummy", seed=0, show_progress=False, **kw)


def assert_clean(llm):
    eng = llm.engine
    assert not eng.has_unfinished_requests()
    assert eng.batcher.block_manager.num_used_blocks == 0
    assert eng.kv_usage == 0.0


def test_batched_equals_alone(tiny_config_dir, reference):
    ps, ref = reference
    llm = make(tiny_config_dir)
    outs = llm.generate(ps, GREEDY)
    assert [o.token_ids for o in outs] == ref
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    assert_clean(llm)


def test_chunked_prefill_equals_whole(tiny_config_dir, reference):
    ps, ref = reference
    llm = make(tiny_config_dir, max_num_batched_tokens=16)  # every long prompt is split
    assert [o.token_ids for o in llm.generate(ps, GREEDY)] == ref
    assert_clean(llm)


def test_prefix_cache_hit_keeps_output(tiny_config_dir, reference):
    ps, ref = reference
    llm = make(tiny_config_dir)
    long = [p for p in ps if len(p) > 40][0]
    first = llm.generate([long], GREEDY)[0]
    again = llm.generate([long], GREEDY)[0]
    assert first.num_cached_tokens == 0
    assert again.num_cached_tokens == (len(long) - 1) // 16 * 16 > 0
    assert again.token_ids == first.token_ids == ref[ps.index(long)]
    assert_clean(llm)


def test_preemption_recomputes_to_same_output(tiny_config_dir, reference):
    ps, ref = reference
    # 8 blocks of 16 tokens cannot hold six sequences of up to 72 tokens: some are preempted.
    llm = make(tiny_config_dir, num_kv_blocks=8, enable_prefix_caching=False)
    outs = llm.generate(ps, GREEDY)
    assert [o.token_ids for o in outs] == ref
    assert llm.engine.batcher.num_preemptions > 0
    assert_clean(llm)


def test_bad_input_leaves_nothing_allocated(tiny_config_dir):
    llm = make(tiny_config_dir, max_model_len=64)
    with pytest.raises(ValueError, match="prompt"):
        llm.generate([[5, 6], []], GREEDY)
    with pytest.raises(ValueError, match="max_tokens"):
        llm.generate([[5] * 60], SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="prompt"):
        llm.generate([[5] * 64], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="token id"):
        llm.generate([[5, 999]], GREEDY)
    with pytest.raises(ValueError, match="text prompts need a tokenizer"):
        llm.generate("hello", GREEDY)
    assert_clean(llm)
    # The engine still works afterwards.
    assert len(llm.generate([[5, 6, 7]], GREEDY)[0].token_ids) == 12


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
        ({"logprobs": 99}, "logprobs"),
        ({"top_k": -3}, "top_k"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_unknown_model_and_arguments(tiny_config_dir):
    with pytest.raises(ValueError, match="no-such-model"):
        LLM(model="no-such-model")
    with pytest.raises(ValueError, match="unknown argument"):
        LLM(model=tiny_config_dir, load_format="dummy", bogus=1)
    with pytest.raises(ValueError, match="dtype"):
        LLM(model=tiny_config_dir, load_format="dummy", dtype="int3")


def test_max_model_len_finishes_with_length(tiny_config_dir):
    llm = make(tiny_config_dir, max_model_len=32)
    out = llm.generate([[5] * 20], SamplingParams(max_tokens=None, temperature=0, ignore_eos=True))[
        0
    ]
    assert len(out.token_ids) == 12 and out.outputs[0].finish_reason == "length"


def test_n_children_and_seeds(tiny_config_dir):
    llm = make(tiny_config_dir)
    p = SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=7, ignore_eos=True)
    a = llm.generate([[5, 6, 7]], p)[0]
    b = llm.generate([[5, 6, 7], [9, 9, 9, 9]], [p, SamplingParams(max_tokens=5)])[0]
    assert len(a.outputs) == 3 and [o.index for o in a.outputs] == [0, 1, 2]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1  # children differ
    assert_clean(llm)


def test_abort_frees_blocks(tiny_config_dir):
    llm = make(tiny_config_dir)
    eng = llm.engine
    eng.add_request("a", [5] * 40, SamplingParams(max_tokens=50, ignore_eos=True))
    eng.add_request("b", [6] * 40, SamplingParams(max_tokens=50, ignore_eos=True))
    eng.step()
    assert eng.kv_usage > 0
    out = eng.abort_request("a")
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert eng.abort_request("a") is None
    eng.abort_request("b")
    assert_clean(llm)


def _run(eng, rid):
    tokens = []
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.request_id == rid:
                tokens += out.outputs[0].token_ids_delta
    return tokens


@pytest.mark.parametrize(
    "params",
    [
        GREEDY,
        SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=0, repetition_penalty=1.5, ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=0, presence_penalty=1.0, min_tokens=12),
    ],
    ids=["greedy", "seeded", "repetition", "presence-min-tokens"],
)
def test_resuming_with_prior_output_gives_the_rest_of_the_same_stream(tiny_config_dir, params):
    # What failover does: another worker recomputes prompt + the tokens already streamed, and
    # must go on exactly as the first one would have (penalties and seeded draws included).
    (prompt,) = prompts(1, seed=3)
    eng = make(tiny_config_dir).engine
    eng.add_request("whole", prompt, params)
    whole = _run(eng, "whole")
    assert len(whole) == 12
    for k in (1, 5, 11):
        eng.add_request(f"resumed-{k}", prompt, params, prior_output_ids=whole[:k])
        assert _run(eng, f"resumed-{k}") == whole[k:]
    assert eng.batcher.block_manager.num_used_blocks == 0
    assert eng.kv_usage == 0.0


def test_prior_output_is_refused_where_it_cannot_resume(tiny_config_dir):
    eng = make(tiny_config_dir).engine
    with pytest.raises(ValueError, match="max_tokens"):
        eng.add_request("a", [5, 6], GREEDY, prior_output_ids=[1] * 12)
    with pytest.raises(ValueError, match="single colocated"):
        eng.add_request("b", [5, 6], GREEDY, handoff=True, prior_output_ids=[1])
    with pytest.raises(ValueError, match="token id"):
        eng.add_request("c", [5, 6], GREEDY, prior_output_ids=[-3])
    assert not eng.has_unfinished_requests() and eng.kv_usage == 0.0


@pytest.mark.parametrize(
    ("dtype", "plan"), [("float32", "onednn-packed"), ("float32", "dense"), ("bfloat16", "")]
)
def test_float32_cpu_engines_run_the_linear_plan_they_are_given(tiny_config_dir, dtype, plan):
    llm = make(tiny_config_dir, device="cpu", dtype=dtype, cpu_linear=plan or "mkl-packed")
    model = llm.engine.runner.model
    assert llm.engine.runner.cpu_linear == plan  # bfloat16: none
    assert (model.model.layers[0].mlp.down_proj.planned is not None) == bool(plan)
    assert len(llm.generate([[5, 6, 7]], GREEDY)[0].token_ids) == 12


def test_an_engine_refuses_a_plan_it_cannot_run_by_name(tiny_config_dir):
    with pytest.raises(ValueError, match="cpu_linear: unknown kernel 'fastest'"):
        make(tiny_config_dir, device="cpu", dtype="float32", cpu_linear="fastest")


def test_a_tiny_model_gets_only_the_blocks_its_batch_can_use(tiny_config_dir):
    llm = make(tiny_config_dir, kv_cache_gib=4.0, max_num_seqs=4, max_model_len=64)
    # 4 GiB would hold ~500k of these 8 KiB blocks; 4 sequences of 64 tokens use 16 at most.
    assert llm.engine.cache_config.num_blocks == max_useful_blocks(4, 64, 16)
