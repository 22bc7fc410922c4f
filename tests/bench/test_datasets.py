"""Workloads: lengths within their range, shared prefixes really shared, conversations replayed."""

from __future__ import annotations

import json

import pytest

from baton.bench import datasets
from baton.bench.runner import LoadConfig, arrival_gaps


def test_random_lengths_stay_in_range_and_are_seeded():
    reqs = datasets.random_requests(200, 100, 20, 0.5, chat=False, seed=1)
    assert all(50 <= r.prompt_len <= 150 and 10 <= r.output_len <= 30 for r in reqs)
    assert all(len(r.prompt) == r.prompt_len for r in reqs)
    assert len({r.prompt_len for r in reqs}) > 10
    again = datasets.random_requests(200, 100, 20, 0.5, chat=False, seed=1)
    assert [r.prompt for r in again] == [r.prompt for r in reqs]
    fixed = datasets.random_requests(5, 64, 8, 0.0, chat=True, seed=1)
    assert all(r.output_len == 8 and r.prompt[0]["role"] == "user" for r in fixed)
    with pytest.raises(ValueError, match="range ratio"):
        datasets.random_requests(1, 10, 10, 1.5, chat=False, seed=0)


def test_shared_prefix_groups_share_their_system_prompt():
    reqs = datasets.shared_prefix_requests(12, 3, 40, 5, 7, chat=False, seed=0)
    for i, r in enumerate(reqs):
        assert len(r.prompt) == 45 and r.prompt[:40] == reqs[i % 3].prompt[:40]
    assert reqs[0].prompt[:40] != reqs[1].prompt[:40]
    chat = datasets.shared_prefix_requests(4, 2, 20, 5, 7, chat=True, seed=0)
    assert chat[0].prompt[0] == chat[2].prompt[0] and chat[0].prompt[0]["role"] == "system"


def test_conversations_replay_up_to_the_last_user_turn(tmp_path):
    path = tmp_path / "c.jsonl"
    convs = datasets.make_conversations(5, seed=3)
    path.write_text("\n".join(json.dumps(c) for c in convs))
    reqs = datasets.conversation_requests(10, path, chat=True, seed=0)
    for r in reqs:
        assert r.prompt[-1]["role"] == "user"
        match = [c for c in convs if c["messages"][: len(r.prompt)] == r.prompt]
        assert match and r.output_len == len(match[0]["messages"][-1]["content"].split())
    text = datasets.conversation_requests(3, path, chat=False, seed=0)
    assert all(r.prompt.endswith("assistant:") for r in text)
    assert datasets.DEFAULT_CONVERSATIONS.exists()  # the set shipped in the repo
    with pytest.raises(ValueError, match="does not exist"):
        datasets.conversation_requests(1, tmp_path / "none.jsonl", chat=True, seed=0)


def test_arrivals_have_the_requested_rate():
    gaps = arrival_gaps(4000, rate=10.0, burstiness=1.0, seed=0)
    assert sum(gaps) / len(gaps) == pytest.approx(0.1, rel=0.05)
    bursty = arrival_gaps(4000, rate=10.0, burstiness=0.2, seed=0)
    assert sum(bursty) / len(bursty) == pytest.approx(0.1, rel=0.15)
    var = lambda xs: sum((x - 0.1) ** 2 for x in xs) / len(xs)  # noqa: E731
    assert var(bursty) > 3 * var(gaps)  # burstier: same mean, wider spread
    assert arrival_gaps(3, float("inf"), 1.0, 0) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="request_rate"):
        LoadConfig(base_url="x", request_rate=0)
    with pytest.raises(ValueError, match="max_concurrency"):
        LoadConfig(base_url="x", max_concurrency=0)
