"""`baton bench --dataset multi-turn` against a tiny fake OpenAI server (FastAPI on loopback): a
turn is sent only after the previous one's answer arrived, each prompt carries the answers really
received, and the per-turn stats are the server's usage summed by turn."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from itertools import pairwise

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from baton.bench import multi_turn
from baton.bench.cli import main
from baton.bench.cluster import free_port
from baton.bench.runner import LoadConfig


def words_of(body: dict) -> list[str]:
    if "messages" in body:
        return [w for m in body["messages"] for w in [m["role"], *m["content"].split()]]
    return body["prompt"].split()


class Fake:
    """Streams `max_tokens` words ("a<n>" for the n-th request), one chunk each, and reports as
    cached the longest word prefix the prompt shares with any earlier prompt."""

    def __init__(self, delay: float = 0.01, fail: tuple[int, int] | None = None) -> None:
        self.delay, self.fail = delay, fail  # fail: (conversation, turn) answered with a 500
        self.log: list[dict] = []
        self.seen: list[list[str]] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": "fake", "object": "model"}]}

        @app.post("/v1/completions")
        @app.post("/v1/chat/completions")
        async def complete(request: Request):
            return await self.answer(await request.json())

        return app

    async def answer(self, body: dict):
        words = words_of(body)
        pairs = pairwise(words)
        conv = next((int(w.rstrip(".")) for a, w in pairs if a == "Conversation"), -1)
        turn = words.count("user") + words.count("user:") - 1
        if self.fail == (conv, turn):
            return JSONResponse({"error": {"message": "scripted"}}, status_code=500)
        with self.lock:
            n = len(self.log)
            cached = max((_common(words, s) for s in self.seen), default=0)
            self.seen.append(words)
            entry = {"conv": conv, "turn": turn, "body": body, "start": time.monotonic()}
            entry |= {"cached": cached, "prompt_tokens": len(words)}
            self.log.append(entry)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        chat = "messages" in body
        out = [f" a{n}w{i}" for i in range(body["max_tokens"])]
        entry["answer"] = "".join(out)

        async def events():
            for piece in out:
                await asyncio.sleep(self.delay)
                choice = {"index": 0, "delta": {"content": piece}} if chat else {"text": piece}
                yield f"data: {json.dumps({'choices': [choice]})}\n\n"
            usage = {"prompt_tokens": len(words), "completion_tokens": len(out)}
            usage["prompt_tokens_details"] = {"cached_tokens": cached}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            with self.lock:
                self.in_flight -= 1
                entry["end"] = time.monotonic()
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


def _common(a: list[str], b: list[str]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@pytest.fixture
def serve():
    servers = []

    def start(fake: Fake) -> str:
        port = free_port()
        cfg = uvicorn.Config(fake.app(), host="127.0.0.1", port=port, log_level="error")
        server = uvicorn.Server(cfg)
        threading.Thread(target=server.run, daemon=True).start()
        servers.append(server)
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline, "the fake server did not start"
            time.sleep(0.01)
        return f"http://127.0.0.1:{port}"

    yield start
    for s in servers:
        s.should_exit = True


def by_conversation(fake: Fake) -> dict[int, list[dict]]:
    convs: dict[int, list[dict]] = {}
    for e in fake.log:
        if e["conv"] >= 0:  # not the warm-up
            convs.setdefault(e["conv"], []).append(e)
    return convs


def bench(url: str, out, *args: str) -> dict:
    argv = ["--base-url", url, "--dataset", "multi-turn", "--num-conversations", "3"]
    argv += ["--turns", "3", "--turn-input-len", "5", "--output-len", "3", "--no-progress"]
    assert main([*argv, *args, "--save-result", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("endpoint", ["/v1/chat/completions", "/v1/completions"])
def test_turns_wait_for_answers_and_carry_them(serve, tmp_path, endpoint, capsys):
    fake = Fake()
    r = bench(serve(fake), tmp_path / "r.json", "--endpoint", endpoint)
    convs = by_conversation(fake)
    assert sorted(convs) == [0, 1, 2] and all(len(c) == 3 for c in convs.values())
    assert fake.max_in_flight > 1  # the conversations ran side by side
    for turns in convs.values():
        assert [e["turn"] for e in turns] == [0, 1, 2]
        for prev, cur in pairwise(turns):
            assert cur["start"] > prev["end"]  # sent only once the previous answer was in
        if endpoint.endswith("chat/completions"):
            for k, e in enumerate(turns):
                msgs = e["body"]["messages"]
                assert msgs[0]["role"] == "system" and msgs[-1]["role"] == "user"
                answers = [m["content"] for m in msgs if m["role"] == "assistant"]
                assert answers == [t["answer"] for t in turns[:k]]
        else:
            for prev, cur in pairwise(turns):
                p = cur["body"]["prompt"]
                assert p.startswith(prev["body"]["prompt"] + prev["answer"] + "\nuser: ")
                assert p.endswith("\nassistant:")

    # the JSON: the usual metrics plus the turns section, summed from the server's usage
    assert (r["completed"], r["failed"], r["dataset"]) == (9, 0, "multi-turn")
    assert r["total_output_tokens"] == 27 and len(r["ttfts"]) == 9 and r["median_ttft_ms"] > 0
    t = r["turns"]
    assert (t["num_conversations"], t["turns_per_conversation"]) == (3, 3)
    log = [e for c in convs.values() for e in c]
    for row in t["per_turn"]:
        mine = [e for e in log if e["turn"] == row["turn"]]
        assert (row["requests"], row["completed"]) == (3, 3)
        assert row["prompt_tokens"] == sum(e["prompt_tokens"] for e in mine)
        assert row["cached_tokens"] == sum(e["cached"] for e in mine)
        assert row["median_ttft_ms"] > 0
    later = [e for e in log if e["turn"] > 0]  # each holds its previous prompt, at least
    assert all(e["cached"] >= len(words_of(p["body"])) for e in later for p in log
               if p["conv"] == e["conv"] and p["turn"] == e["turn"] - 1)  # fmt: skip
    assert t["total_cached_tokens"] == sum(e["cached"] for e in log)
    assert t["total_prompt_tokens"] == r["total_input_tokens"]
    assert t["prompt_tokens_computed"] == t["total_prompt_tokens"] - t["total_cached_tokens"]
    assert t["turn_indices"] == [0, 1, 2] * 3 and t["conversations"] == [0] * 3 + [1] * 3 + [2] * 3
    out = capsys.readouterr().out
    assert "Turns" in out and "Mean TTFT (ms)" in out


def test_max_concurrency_caps_requests_in_flight(serve, tmp_path):
    fake = Fake()
    r = bench(serve(fake), tmp_path / "r.json", "--max-concurrency", "2", "--num-warmups", "0")
    assert fake.max_in_flight == 2 and r["completed"] == 9 and len(fake.log) == 9


def test_a_failed_turn_ends_its_conversation(serve, tmp_path):
    fake = Fake(fail=(1, 1))
    out = tmp_path / "r.json"
    argv = ["--base-url", serve(fake), "--dataset", "multi-turn", "--num-conversations", "2"]
    argv += ["--turns", "3", "--turn-input-len", "4", "--output-len", "2", "--no-progress"]
    assert main([*argv, "--save-result", str(out)]) == 0
    r = json.loads(out.read_text())
    assert (r["completed"], r["failed"]) == (4, 2)
    errors = sorted(r["error_counts"].items())
    assert [n for _, n in errors] == [1, 1] and errors[0][0].startswith("HTTP 500")
    assert errors[1][0] == "not sent: turn 1 failed"
    assert [p["completed"] for p in r["turns"]["per_turn"]] == [2, 1, 1]
    assert len(by_conversation(fake)[1]) == 1  # its third turn never went out


def test_after_first_turn_runs_between_the_first_and_second_turns(serve):
    fake = Fake()
    url = serve(fake)
    seen = []
    hook = lambda: seen.append([(e["turn"], "end" in e) for e in fake.log])  # noqa: E731
    convs = multi_turn.make_conversations(4, 2, 3, 0.0, seed=1)
    cfg = LoadConfig(base_url=url, num_warmups=0, progress=False)
    results, duration = asyncio.run(multi_turn.run_multi_turn(convs, cfg, 2, hook))
    assert seen == [[(0, True)] * 4]  # all first turns done, no second one sent yet
    assert [r.turn for r in results] == [0, 1] * 4 and all(r.success for r in results)
    assert duration > 0


def test_conversations_are_seeded_and_share_no_opening():
    convs = multi_turn.make_conversations(5, 3, 20, 0.5, seed=4)
    assert convs == multi_turn.make_conversations(5, 3, 20, 0.5, seed=4)
    assert len({c.system for c in convs}) == 5 and all(len(c.users) == 3 for c in convs)
    assert all(10 <= len(u.split()) <= 30 for c in convs for u in c.users)
    text = multi_turn.first_prompt(convs[0], chat=False)
    nxt = multi_turn.next_prompt(text, " fine", convs[0].users[1])
    assert nxt == f"{text} fine\nuser: {convs[0].users[1]}\nassistant:"
    msgs = multi_turn.next_prompt(multi_turn.first_prompt(convs[0], chat=True), "ok", "more")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    with pytest.raises(ValueError, match="at least one"):
        multi_turn.make_conversations(1, 0, 5, 0.0, seed=0)


def test_think_time_spaces_a_users_turns_and_breaks_lockstep(serve, tmp_path):
    fake = Fake()
    r = bench(serve(fake), tmp_path / "r.json", "--think-time", "0.3", "--num-warmups", "0")
    assert r["turns"]["think_time"] == 0.3 and r["completed"] == 9
    convs = by_conversation(fake)
    gaps = [cur["start"] - prev["end"] for c in convs.values() for prev, cur in pairwise(c)]
    assert min(gaps) > 0 and 0.1 < sum(gaps) / len(gaps) < 1.2  # exponential, mean 0.3 s
    second = sorted(c[1]["start"] for c in convs.values())
    assert second[-1] - second[0] > 0.01  # second turns no longer leave together
    # seeded: the same pauses again
    fake2 = Fake()
    bench(serve(fake2), tmp_path / "r2.json", "--think-time", "0.3", "--num-warmups", "0")
    gaps2 = [cur["start"] - prev["end"] for c in by_conversation(fake2).values()
             for prev, cur in pairwise(c)]  # fmt: skip
    assert all(abs(a - b) < 0.1 for a, b in zip(sorted(gaps), sorted(gaps2), strict=True))
