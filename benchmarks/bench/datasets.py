"""Workloads: random token prompts, groups sharing a long system prompt, synthetic conversations.

Prompts for /v1/completions are token ids (exact lengths on any server that accepts them, as
vLLM and Baton do); for chat they are text: random words, a token or so each.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

WORDS = (
    "time", "person", "year", "way", "day", "thing", "man", "world", "life", "hand", "part",
    "child", "eye", "woman", "place", "work", "week", "case", "point", "number", "group",
    "problem", "fact", "water", "river", "city", "music", "light", "paper", "garden", "window",
    "table", "story", "market", "letter", "engine", "signal", "cloud", "forest", "winter",
    "summer", "ocean", "bridge",
)  # fmt: skip
DEFAULT_CONVERSATIONS = Path(__file__).resolve().parents[1] / "data" / "conversations.jsonl"


@dataclass(frozen=True)
class BenchRequest:
    prompt: list[int] | str | list[dict]  # token ids, text, or chat messages
    prompt_len: int  # intended prompt tokens (the server's usage is what gets reported)
    output_len: int


def _lengths(mean: int, ratio: float, n: int, rng: random.Random) -> list[int]:
    """n lengths uniform in [mean * (1 - ratio), mean * (1 + ratio)], at least 1."""
    if not 0 <= ratio < 1:
        raise ValueError(f"range ratio must be in [0, 1), got {ratio}")
    lo, hi = max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio)))
    return [rng.randint(lo, hi) for _ in range(n)]


def _ids(n: int, rng: random.Random, vocab: tuple[int, int]) -> list[int]:
    return [rng.randrange(*vocab) for _ in range(n)]


def _text(n: int, rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def random_requests(
    num: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    chat: bool,
    seed: int,
    vocab: tuple[int, int] = (1000, 30000),
) -> list[BenchRequest]:
    rng = random.Random(seed)
    ins = _lengths(input_len, range_ratio, num, rng)
    outs = _lengths(output_len, range_ratio, num, rng)
    reqs = []
    for n, o in zip(ins, outs, strict=True):
        prompt = [{"role": "user", "content": _text(n, rng)}] if chat else _ids(n, rng, vocab)
        reqs.append(BenchRequest(prompt, n, o))
    return reqs


def shared_prefix_requests(
    num: int,
    num_groups: int,
    prefix_len: int,
    input_len: int,
    output_len: int,
    chat: bool,
    seed: int,
    vocab: tuple[int, int] = (1000, 30000),
) -> list[BenchRequest]:
    """`num_groups` long system prompts, each shared by its group's requests (round robin)."""
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}")
    rng = random.Random(seed)
    if chat:
        prefixes = [_text(prefix_len, rng) for _ in range(num_groups)]
    else:
        prefixes = [_ids(prefix_len, rng, vocab) for _ in range(num_groups)]
    reqs = []
    for i in range(num):
        p = prefixes[i % num_groups]
        if chat:
            prompt = [
                {"role": "system", "content": p},
                {"role": "user", "content": _text(input_len, rng)},
            ]
        else:
            prompt = p + _ids(input_len, rng, vocab)
        reqs.append(BenchRequest(prompt, prefix_len + input_len, output_len))
    return reqs


def make_conversations(num: int, seed: int) -> list[dict]:
    """Synthetic multi-turn chats: 1..4 user/assistant exchanges of random words."""
    rng = random.Random(seed)
    convs = []
    for i in range(num):
        turns = []
        for _ in range(rng.randint(1, 4)):
            turns.append({"role": "user", "content": _text(rng.randint(8, 96), rng)})
            turns.append({"role": "assistant", "content": _text(rng.randint(8, 128), rng)})
        convs.append({"id": f"conv-{i}", "messages": turns})
    return convs


def conversation_requests(
    num: int, path: str | Path | None, chat: bool, seed: int
) -> list[BenchRequest]:
    """Each request replays a conversation up to its last user turn; the recorded answer's word
    count is the output length. Completions get the history flattened into one text."""
    path = Path(path) if path else DEFAULT_CONVERSATIONS
    if not path.exists():
        raise ValueError(f"{path} does not exist; write it with benchmarks/make_conversations.py")
    convs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not convs:
        raise ValueError(f"{path} holds no conversations")
    rng = random.Random(seed)
    reqs = []
    for _ in range(num):
        msgs = rng.choice(convs)["messages"]
        history, answer = msgs[:-1], msgs[-1]["content"]
        words = sum(len(m["content"].split()) for m in history)
        if chat:
            prompt: str | list[dict] = history
        else:
            prompt = "\n".join(f"{m['role']}: {m['content']}" for m in history) + "\nassistant:"
        reqs.append(BenchRequest(prompt, words, len(answer.split())))
    return reqs
