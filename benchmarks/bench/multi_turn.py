"""Multi-turn chats: each conversation is a client that sends turn k only once turn k-1's answer
has arrived, its history growing by the answer it really got and a new user message.

Chat endpoints get the messages (a system message of its own per conversation, then the user
turns and the real assistant answers); completions get the same history as one text, each turn's
prompt the previous prompt + the answer received + "\\nuser: ...\\nassistant:". Conversations run
side by side; `max_concurrency` caps the requests in flight (a conversation between two turns
holds no slot). With a think time, a user waits a while (exponential, that mean, seeded per
conversation) after each answer before sending the next turn, as people read and type; without
one, conversations that started together stay in lockstep, every turn arriving at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
from tqdm.asyncio import tqdm

from baton.bench.client import request_body, send
from baton.bench.datasets import BenchRequest, _lengths, _text
from baton.bench.metrics import RequestResult
from baton.bench.runner import (
    LoadConfig,
    arrival_gaps,
    headers_for,
    new_client,
    resolve_model,
)


@dataclass(frozen=True)
class Conversation:
    system: str
    users: tuple[str, ...]  # the new user message of each turn


@dataclass
class TurnResult(RequestResult):
    conversation: int = -1
    turn: int = -1


def make_conversations(
    num: int, turns: int, turn_input_len: int, range_ratio: float, seed: int, first: int = 0
) -> list[Conversation]:
    """`num` conversations of `turns` user messages of about `turn_input_len` words each."""
    if num < 1 or turns < 1:
        raise ValueError(f"need at least one conversation and one turn, got {num} x {turns}")
    rng = random.Random(seed)
    convs = []
    for i in range(first, first + num):
        lens = _lengths(turn_input_len, range_ratio, turns, rng)
        # NOTE: the system message leads with the conversation's number, so two conversations
        # share no full KV block: all reuse is within a conversation.
        system = f"Conversation {i}. You are a helpful assistant."
        convs.append(Conversation(system, tuple(_text(n, rng) for n in lens)))
    return convs


def first_prompt(conv: Conversation, chat: bool) -> str | list[dict]:
    if chat:
        return [
            {"role": "system", "content": conv.system},
            {"role": "user", "content": conv.users[0]},
        ]
    return f"system: {conv.system}\nuser: {conv.users[0]}\nassistant:"


def next_prompt(prev: str | list[dict], answer: str, user: str) -> str | list[dict]:
    """The prompt of the next turn: the previous one, the answer received, the new message."""
    if isinstance(prev, list):
        return [
            *prev,
            {"role": "assistant", "content": answer},
            {"role": "user", "content": user},
        ]
    return f"{prev}{answer}\nuser: {user}\nassistant:"


def _words(prompt: str | list[dict]) -> int:
    if isinstance(prompt, str):
        return len(prompt.split())
    return sum(len(m["content"].split()) for m in prompt)


async def send_turn(
    client: httpx.AsyncClient,
    url: str,
    req: BenchRequest,
    body: dict,
    headers: dict,
    run_start: float,
) -> TurnResult:
    """client.send into a TurnResult (which keeps the answer's text and cached tokens)."""
    result = TurnResult(False, req.prompt_len, 0, time.perf_counter() - run_start)
    return await send(client, url, req, body, headers, run_start, result)


async def run_multi_turn(
    convs: list[Conversation],
    cfg: LoadConfig,
    output_len: int,
    after_first_turn: Callable[[], object] | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    think_time: float = 0.0,
) -> tuple[list[TurnResult], float]:
    """(results by conversation, then turn; seconds from the first send to the last answer).

    Conversations start at `cfg.request_rate` (inf: all at once). A failed turn ends its
    conversation: its later turns are counted as failed, never sent. `after_first_turn`: when
    given, every conversation waits after its first turn until all have had theirs, then this
    runs (in a thread) before any second turn is sent, e.g. to read a server's counters."""
    chat = cfg.endpoint.rstrip("/").endswith("chat/completions")
    headers = headers_for(cfg)
    url = cfg.base_url.rstrip("/") + cfg.endpoint
    async with new_client(cfg, transport) as client:
        model = await resolve_model(client, cfg, headers)
        rng = random.Random(cfg.seed + 7919)
        for _ in range(cfg.num_warmups):  # untimed, and sharing no prefix with the chats
            text = _text(max(1, len(convs[0].users[0].split())), rng)
            prompt = [{"role": "user", "content": text}] if chat else text
            warm = BenchRequest(prompt, _words(prompt), output_len)
            body = request_body(warm, cfg.endpoint, model, cfg.ignore_eos)
            w = await send_turn(client, url, warm, body, headers, time.perf_counter())
            if not w.success:
                raise RuntimeError(f"the warm-up request failed: {w.error}")
        sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
        total = sum(len(c.users) for c in convs)
        bar = tqdm(total=total, disable=not cfg.progress, desc="turns")
        waiting, first_done = len(convs), asyncio.Event()
        start = time.perf_counter()

        async def first_turn_over() -> None:
            nonlocal waiting
            waiting -= 1
            if waiting == 0:
                await asyncio.to_thread(after_first_turn)
                first_done.set()
            await first_done.wait()

        async def converse(i: int, conv: Conversation) -> list[TurnResult]:
            out: list[TurnResult] = []
            prompt = first_prompt(conv, chat)
            user = random.Random(cfg.seed * 1_000_003 + i)  # this conversation's pauses
            for k in range(len(conv.users)):
                if k:
                    prompt = next_prompt(prompt, out[-1].text, conv.users[k])
                    if think_time > 0:
                        await asyncio.sleep(user.expovariate(1.0 / think_time))
                req = BenchRequest(prompt, _words(prompt), output_len)
                body = request_body(req, cfg.endpoint, model, cfg.ignore_eos)
                async with sem or contextlib.nullcontext():
                    res = await send_turn(client, url, req, body, headers, start)
                res.conversation, res.turn = i, k
                out.append(res)
                bar.update(1)
                if k == 0 and after_first_turn is not None:
                    await first_turn_over()
                if not res.success:
                    for j in range(k + 1, len(conv.users)):
                        t = time.perf_counter() - start
                        skipped = TurnResult(False, 0, 0, t, conversation=i, turn=j)
                        skipped.error = f"not sent: turn {k} failed"
                        out.append(skipped)
                    bar.update(len(conv.users) - k - 1)
                    break
            return out

        tasks = []
        gaps = arrival_gaps(len(convs), cfg.request_rate, cfg.burstiness, cfg.seed)
        for i, (conv, gap) in enumerate(zip(convs, gaps, strict=True)):
            if gap > 0:
                await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(converse(i, conv)))
        per_conv = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        bar.close()
    return [r for rs in per_conv for r in rs], duration


def _median_ms(seconds: list[float]) -> float | None:
    if not seconds:
        return None
    s = sorted(seconds)
    mid = len(s) // 2
    return 1e3 * (s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2)


@dataclass
class _Acc:
    requests: int = 0
    ttfts: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0


def turn_stats(results: list[TurnResult]) -> dict:
    """Per turn index: requests, completed, median TTFT, prompt and cached tokens (usage); the
    totals; and the per-request conversation, turn and cached-token arrays."""
    by_turn: dict[int, _Acc] = {}
    for r in results:
        a = by_turn.setdefault(r.turn, _Acc())
        a.requests += 1
        if r.success:
            a.ttfts.append(r.ttft)
            a.prompt_tokens += r.prompt_len
            a.cached_tokens += r.cached_tokens
    per_turn = [
        {
            "turn": k,
            "requests": a.requests,
            "completed": len(a.ttfts),
            "median_ttft_ms": _median_ms(a.ttfts),
            "prompt_tokens": a.prompt_tokens,
            "cached_tokens": a.cached_tokens,
            "mean_prompt_tokens": a.prompt_tokens / len(a.ttfts) if a.ttfts else None,
        }
        for k, a in sorted(by_turn.items())
    ]
    prompt = sum(a.prompt_tokens for a in by_turn.values())
    cached = sum(a.cached_tokens for a in by_turn.values())
    return {
        "num_conversations": len({r.conversation for r in results}),
        "turns_per_conversation": len(by_turn),
        "per_turn": per_turn,
        "total_prompt_tokens": prompt,
        "total_cached_tokens": cached,
        "prompt_tokens_computed": prompt - cached,
        "cached_fraction": cached / prompt if prompt else 0.0,
        "median_ttft_ms_after_first_turn": _median_ms(
            [r.ttft for r in results if r.success and r.turn > 0]
        ),
        "conversations": [r.conversation for r in results],
        "turn_indices": [r.turn for r in results],
        "cached_tokens": [r.cached_tokens for r in results],
    }


def format_turns(stats: dict) -> str:
    lines = [f"{' Turns ':-^60}"]
    lines.append(f"{'turn':>4} {'done':>6} {'median TTFT ms':>15} {'prompt tok':>11} {'cached':>9}")
    for t in stats["per_turn"]:
        ttft = t["median_ttft_ms"]
        ttft_s = f"{ttft:>15.2f}" if ttft is not None else f"{'-':>15}"
        lines.append(
            f"{t['turn']:>4} {t['completed']:>3}/{t['requests']:<2} {ttft_s} "
            f"{t['prompt_tokens']:>11d} {t['cached_tokens']:>9d}"
        )
    lines.append(
        f"{'Total prompt / cached tokens':<44}"
        f"{stats['total_prompt_tokens']:>7d} / {stats['total_cached_tokens']:<7d}"
    )
    lines.append(f"{'Cached fraction of prompt tokens':<44}{stats['cached_fraction']:>16.3f}")
    lines.append("=" * 60)
    return "\n".join(lines)
