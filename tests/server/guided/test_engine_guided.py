"""Guided decoding in the engine, on the default model: outputs stay inside their constraint,
greedy and sampled, batched beside free rows, and a grammar being compiled stalls nobody."""

from __future__ import annotations

import json
import re
import threading

import jsonschema
import pytest

from baton import SamplingParams
from tests.server.guided.schemas import PROMPTS, SCHEMAS


def chat_ids(llm, text: str) -> list[int]:
    return llm.apply_chat_template([{"role": "user", "content": text}])


def json_params(schema, **kw) -> SamplingParams:
    kw = {"max_tokens": 80, "temperature": 0, **kw}
    return SamplingParams(guided="json", guided_spec=json.dumps(schema), **kw)


def test_every_finished_output_validates_against_its_schema(smollm2):
    # NOTE: sampled, the harder case for a mask; the dozen greedy run through a served
    # handoff (tests/server/router/test_structured_e2e.py), compact greedy output below.
    names = list(SCHEMAS)
    kw = {"temperature": 0.9, "seed": 7}
    params = [json_params(SCHEMAS[n], guided_compact=i % 2 == 0, **kw) for i, n in enumerate(names)]
    outs = smollm2.generate([chat_ids(smollm2, PROMPTS[n]) for n in names], params)
    finished = 0
    for name, out in zip(names, outs, strict=True):
        o = out.outputs[0]
        if o.finish_reason == "length":
            continue
        assert o.finish_reason == "stop", (name, o.text)
        jsonschema.validate(json.loads(o.text), SCHEMAS[name])
        finished += 1
    assert finished >= len(names) * 3 // 4, [o.outputs[0].text for o in outs]


def test_compact_json_has_no_free_whitespace(smollm2):
    schema = SCHEMAS["nested"]
    outs = smollm2.generate(
        [chat_ids(smollm2, PROMPTS["nested"])], json_params(schema, guided_compact=True)
    )
    text = outs[0].outputs[0].text
    assert not re.search(r"\s", json.dumps(json.loads(text), separators=(",", ":")))
    assert not re.search(r'[\s](?=(?:[^"]*"[^"]*")*[^"]*$)', text), text  # none outside strings


def test_regex_and_choice_hold_sampled_and_beside_free_rows(smollm2):
    regex = SamplingParams(
        max_tokens=20, temperature=1.0, seed=3, guided="regex", guided_spec=r"\(\d{3}\) \d{3}-\d{4}"
    )
    choice = SamplingParams(
        max_tokens=10,
        temperature=1.0,
        seed=4,
        guided="lark",
        guided_spec='start: "yes" | "no" | "maybe"',
    )
    free = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = ["My phone number is", "Is the sky green? Answer:", "Once upon a time"] * 2
    outs = smollm2.generate(prompts, [regex, choice, free] * 2)
    for out in outs[0::3]:
        assert re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", out.outputs[0].text), out.outputs[0].text
        assert out.outputs[0].finish_reason == "stop"
    for out in outs[1::3]:
        assert out.outputs[0].text in ("yes", "no", "maybe")
    plain = smollm2.generate(prompts[2], free)[0]
    assert outs[2].outputs[0].text == plain.outputs[0].text  # the free row is untouched


def test_n_choices_each_follow_the_grammar(smollm2):
    p = SamplingParams(
        n=3, max_tokens=12, temperature=1.0, seed=1, guided="regex", guided_spec="[a-z]{2,6}"
    )
    out = smollm2.generate(["Name a fruit:"], p)[0]
    assert len(out.outputs) == 3
    assert all(re.fullmatch("[a-z]{2,6}", o.text) for o in out.outputs), out.outputs


def test_a_refused_constraint_is_a_clear_error_and_holds_nothing(smollm2):
    engine = smollm2.engine
    free = engine.batcher.block_manager.num_free_blocks
    for kind, spec, why in [
        ("json", '{"type": "strin"}', "strin"),
        ("json", "[1, 2]", "object or a boolean"),
        ("regex", "[a-z", "regex"),
        ("lark", "start: missing_rule", "missing_rule"),
    ]:
        with pytest.raises(ValueError, match=f"guided_spec: .*{re.escape(why)}"):
            engine.add_request("bad", "hi", SamplingParams(guided=kind, guided_spec=spec))
    assert not engine.has_unfinished_requests()
    assert engine.batcher.block_manager.num_free_blocks == free


def test_a_grammar_compiling_stalls_no_other_request(smollm2, monkeypatch):
    engine = smollm2.engine
    gate = threading.Event()
    real = type(engine.guided)._compile

    def slow_compile(self, key):
        assert gate.wait(30)
        return real(self, key)

    monkeypatch.setattr(type(engine.guided), "_compile", slow_compile)
    schema = {
        "type": "object",
        "properties": {"slow": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["slow"],
        "additionalProperties": False,
    }
    p = json_params(schema, guided_compact=True)
    engine.add_request("held", chat_ids(smollm2, "Give a number."), p)
    engine.add_request(
        "free", "Hello", SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    )
    done = {}
    for _ in range(10):  # the free request finishes while the grammar is still compiling
        for out in engine.step():
            done[out.request_id] = out
        if "free" in done and done["free"].finished:
            break
    assert done["free"].finished and "held" not in done
    gate.set()
    while "held" not in done or not done["held"].finished:
        for out in engine.step():
            done[out.request_id] = out
    assert json.loads(done["held"].outputs[0].text)["slow"] is not None
    compiled = engine.guided.num_compiled
    engine.add_request("again", chat_ids(smollm2, "Give a number."), p)
    assert engine.guided.ready("again")  # cached: no compile, ready at once
    assert engine.guided.num_compiled == compiled
    engine.abort_request("again")


def test_a_resumed_request_goes_on_from_the_same_grammar_state(smollm2):
    """What a decode worker and a failover recompute do: replay the tokens produced so far."""
    ids = chat_ids(smollm2, PROMPTS["person"])
    p = json_params(SCHEMAS["person"], guided_compact=True)
    whole = smollm2.generate([ids], p)[0].outputs[0]
    head = list(whole.token_ids[:5])
    engine = smollm2.engine
    engine.add_request("resumed", ids, p, prior_output_ids=head)
    out = None
    while out is None or not out.finished:
        for o in engine.step():
            out = o
    assert head + list(out.outputs[0].token_ids) == list(whole.token_ids)


def test_the_grammar_cache_is_bounded(smollm2, monkeypatch):
    g = smollm2.engine.guided
    monkeypatch.setattr(g, "_cache_size", 2)
    for i in range(4):
        p = SamplingParams(guided="regex", guided_spec=f"a{{{i + 1}}}")
        g.start(f"s{i}", p, replay=[])
        assert g.ready(f"s{i}", wait=True)
        g.release(f"s{i}")
    assert len(g._templates) == 2
