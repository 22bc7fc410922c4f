"""The default model: greedy tokens equal transformers' `generate` in float32."""

from __future__ import annotations

import functools

import pytest
import torch

from baton import SamplingParams

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea. The waves",
    "def fibonacci(n):",
    "Once upon a time, in a small village at the edge of a vast forest, there lived an old "
    "woodcutter and his daughter. Every morning they",
]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def hf_model(smollm2):
    from transformers import AutoModelForCausalLM

    folder = smollm2.engine.model_dir
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_greedy(smollm2, hf_model):
    @functools.cache  # several tests ask for the same prompts
    def cached(ids: tuple[int, ...]) -> list[int]:
        return run(list(ids))

    def run(ids):
        with torch.inference_mode():
            out = hf_model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=MAX_TOKENS,
                do_sample=False,
                pad_token_id=smollm2.tokenizer.eos_token_id,
            )
        gen = out[0, len(ids) :].tolist()
        eos = smollm2.tokenizer.eos_token_id
        return gen[: gen.index(eos) + 1] if eos in gen else gen

    return lambda ids: cached(tuple(ids))


PARAMS = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)


def test_alone_equals_transformers(smollm2, hf_greedy):
    for p in PROMPTS:
        ids = smollm2.tokenizer.encode(p)
        assert smollm2.generate([p], PARAMS)[0].token_ids == hf_greedy(ids), p


def test_batch_of_different_lengths_equals_transformers(smollm2, hf_greedy):
    outs = smollm2.generate(PROMPTS, PARAMS)
    for p, o in zip(PROMPTS, outs, strict=True):
        assert o.token_ids == hf_greedy(smollm2.tokenizer.encode(p)), p
        assert o.text == smollm2.tokenizer.decode(o.token_ids, skip_special_tokens=True)


def test_shared_prefix_hit_equals_transformers(smollm2, hf_greedy):
    system = (
        "You are a careful assistant. Answer in one sentence, plainly, and never invent "
        "facts you are not sure of. "
    ) * 2
    a, b = system + "What is the tallest mountain?", system + "Why is the sky blue?"
    first = smollm2.generate([a], PARAMS)[0]
    second = smollm2.generate([b], PARAMS)[0]
    assert second.num_cached_tokens >= 32  # the shared system prompt came from the cache
    assert first.token_ids == hf_greedy(smollm2.tokenizer.encode(a))
    assert second.token_ids == hf_greedy(smollm2.tokenizer.encode(b))


def test_chat_uses_the_template(smollm2):
    msgs = [{"role": "user", "content": "Say hello."}]
    out = smollm2.chat(msgs, PARAMS)[0]
    text = smollm2.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert out.prompt_token_ids == smollm2.tokenizer.encode(text, add_special_tokens=False)
    assert out.text.strip()


def test_stop_string_is_not_emitted(smollm2):
    full = smollm2.generate([PROMPTS[3]], PARAMS)[0].text
    word = full.split()[2]
    cut = smollm2.generate(
        [PROMPTS[3]], SamplingParams(max_tokens=MAX_TOKENS, temperature=0, stop=[word])
    )[0]
    assert cut.outputs[0].finish_reason == "stop" and cut.outputs[0].stop_reason == word
    assert cut.text == full[: full.index(word)]


def test_seeded_sampling_is_reproducible_in_any_batch(smollm2):
    p = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=1234)
    alone = smollm2.generate([PROMPTS[0]], p)[0].token_ids
    mixed = smollm2.generate(
        [PROMPTS[1], PROMPTS[0], PROMPTS[2]],
        [
            SamplingParams(max_tokens=9, temperature=1.0),
            p,
            SamplingParams(max_tokens=20, temperature=0.5, seed=9),
        ],
    )[1]
    assert mixed.token_ids == alone


def test_logprobs_are_returned(smollm2):
    out = smollm2.generate([PROMPTS[0]], SamplingParams(max_tokens=4, temperature=0, logprobs=3))[
        0
    ].outputs[0]
    assert len(out.logprobs) == len(out.token_ids)
    for tok, lp, top in out.logprobs:
        assert len(top) == 3 and top[0][0] == tok and lp == pytest.approx(top[0][1])
        assert lp <= 0
