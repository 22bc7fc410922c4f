"""Incremental detokenizer: whole characters only, stop strings caught across tokens."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from baton.scheduler.sampling_params import SamplingParams
from baton.server.detokenizer import IncrementalDetokenizer

CORPUS = [
    "héllo wörld 日本語 emoji 🙂",
    "the quick brown fox jumps over the lazy dog",
    "héllo again, wörld! 日本語を話します 🙂🙂",
    "stop here. STOP there; and the end of the story",
]
PROMPTS = ["héllo", "the quick brown", "日本語", "emoji 🙂 and", "x"]
EOT = "<|endoftext|>"


def train(pre_tokenizer, decoder, alphabet: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoder
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=[EOT], initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(CORPUS * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return train(
        pre_tokenizers.ByteLevel(add_prefix_space=False),
        decoders.ByteLevel(),
        pre_tokenizers.ByteLevel.alphabet(),
    )


def stream(tok, prompt_ids: list[int], output_ids: list[int], **kw):
    detok = IncrementalDetokenizer(tok, prompt_ids, SamplingParams(**kw))
    deltas = []
    for t in output_ids:
        deltas.append(detok.add(t))
        if detok.stop_hit is not None:
            break
    deltas.append(detok.flush())
    return detok, deltas


def test_multibyte_character_is_never_split(tokenizer):
    ids = tokenizer.encode("ok 🚀!")  # unseen in training: one token per byte
    assert len(ids) >= 6
    detok, deltas = stream(tokenizer, tokenizer.encode("héllo"), ids)
    assert "\ufffd" not in "".join(deltas)
    assert "🚀" in deltas
    assert "".join(deltas) == detok.text == "ok 🚀!"


def test_plain_stream_matches_full_decode(tokenizer):
    out = tokenizer.encode(" wörld 日本語 🙂 the end")
    detok, deltas = stream(tokenizer, tokenizer.encode("héllo"), out)
    assert deltas[-1] == ""  # nothing held back without stop strings
    assert "".join(deltas) == detok.text == tokenizer.decode(out)
    assert detok.stop_hit is None


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_across_tokens(tokenizer, include):
    out = tokenizer.encode(" quick brown fox jumps over")
    detok, deltas = stream(
        tokenizer,
        tokenizer.encode("the"),
        out,
        stop=["zzz", "own fo"],
        include_stop_str_in_output=include,
    )
    assert detok.stop_hit == "own fo"
    expected = " quick brown fo" if include else " quick br"
    assert "".join(deltas) == detok.text == expected
    assert detok.add(tokenizer.encode("x")[0]) == ""  # nothing after a stop


def test_stop_string_is_held_back_until_resolved(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("x"), SamplingParams(stop="dogs"))
    emitted = "".join(detok.add(t) for t in tokenizer.encode(" lazy dog"))
    assert emitted == " lazy "  # "dog" may still become "dogs"
    assert detok.flush() == "dog"
    assert detok.text == " lazy dog" and detok.stop_hit is None


def test_special_tokens(tokenizer):
    eot = tokenizer.convert_tokens_to_ids(EOT)
    out = tokenizer.encode(" wörld") + [eot] + tokenizer.encode(" end")
    for skip in (True, False):
        _, deltas = stream(
            tokenizer, [eot] + tokenizer.encode("héllo"), out, skip_special_tokens=skip
        )
        assert "".join(deltas) == tokenizer.decode(out, skip_special_tokens=skip)
        assert (EOT in "".join(deltas)) is not skip


def test_prompt_context_keeps_the_leading_space():
    # SentencePiece-style: a lone "▁again" decodes to "again", but after a prompt to " again".
    tok = train(
        pre_tokenizers.Metaspace(),
        decoders.Metaspace(),
        sorted({c for line in CORPUS for c in line}),
    )
    prompt = tok.encode("the quick brown")
    out = tok.encode("fox jumps")
    _, deltas = stream(tok, prompt, out)
    full = tok.decode(prompt + out)
    assert "".join(deltas) == full[len(tok.decode(prompt)) :] == " fox jumps"


def first_stop(text: str, stops: list[str]) -> tuple[str, int] | None:
    """The stop string that completes first (the longest of those completing together)."""
    found = [(text.find(s) + len(s), -len(s), s) for s in stops if s in text]
    if not found:
        return None
    end, neg_len, s = min(found)
    return s, end + neg_len


@st.composite
def cases(draw, tok):
    vocab = len(tok)
    prompt = tok.encode(draw(st.sampled_from(PROMPTS)))
    # Mostly real text (which stop strings can hit), sometimes arbitrary ids (broken bytes).
    if draw(st.booleans()):
        text = draw(st.text(alphabet="hélo wörd日本語🙂 the.!", max_size=30))
        output = tok.encode(text)
    else:
        output = draw(st.lists(st.integers(0, vocab - 1), max_size=30))
    skip = draw(st.booleans())
    full = tok.decode(output, skip_special_tokens=skip)
    stops = []
    for _ in range(draw(st.integers(0, 3))):
        if full and draw(st.booleans()):
            i = draw(st.integers(0, len(full) - 1))
            j = draw(st.integers(i + 1, min(len(full), i + 6)))
            stops.append(full[i:j])
        else:
            stops.append(draw(st.text(alphabet="helo wörd日🙂", min_size=1, max_size=4)))
    include = draw(st.booleans())
    return prompt, output, skip, stops, include


@settings(deadline=None, max_examples=150)
@given(data=st.data())
def test_deltas_join_to_the_truncated_full_decode(tokenizer, data):
    prompt, output, skip, stops, include = data.draw(cases(tokenizer))
    detok = IncrementalDetokenizer(
        tokenizer,
        prompt,
        SamplingParams(stop=stops, skip_special_tokens=skip, include_stop_str_in_output=include),
    )
    full = tokenizer.decode(output, skip_special_tokens=skip)
    hit = first_stop(full, stops)
    expected = full
    if hit is not None:
        expected = full[: hit[1] + (len(hit[0]) if include else 0)]

    joined = ""
    for t in output:
        delta = detok.add(t)
        joined += delta
        assert full.startswith(joined)  # emitted text is final: never revised or split
        assert detok.text == joined
        if detok.stop_hit is not None:
            break
    if detok.stop_hit is None:
        joined += detok.flush()

    assert joined == detok.text == expected
    assert detok.stop_hit == (hit[0] if hit else None)
    body = joined[: len(joined) - len(hit[0])] if hit and include else joined
    assert not any(s in body for s in stops)
