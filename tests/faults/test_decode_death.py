"""A decode worker killed mid-stream: the stream goes on, unbroken, on the other decode worker."""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest

from baton import SamplingParams
from baton.bench.cluster import Cluster
from tests.faults.conftest import random_prompt

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(cut_model):
    # each test kills one decode worker (the last test the last one)
    workers = {"p0": ("prefill",), "d0": ("decode",), "d1": ("decode",), "d2": ("decode",)}
    with Cluster.running(workers, model=cut_model) as c:
        yield c


def test_sigkill_of_the_decode_worker_mid_stream_keeps_the_stream(cluster, reference):
    prompt = random_prompt(1, 40)
    killed = []

    def kill_after_five(n):
        if n == 5 and not killed:
            killed.append(cluster.serving("decode"))
            cluster.kill(killed[0])

    text, error = cluster.stream(prompt, 64, on_chunk=kill_after_five)
    assert killed and error is None
    assert text == reference(prompt, 64)  # greedy output as if nothing had happened
    assert cluster.worker_states()[killed[0]]["state"] == "dead"
    # Every block the request held, on the worker that prefilled it and on the one that
    # finished it, is free again.
    ws = cluster.wait_idle()
    assert {w for w, s in ws.items() if s["state"] != "dead"} == {"p0", "d0", "d1", "d2"} - set(
        killed
    )


def test_a_constrained_stream_resumes_in_the_same_grammar_state(cluster, cut_llm):
    """The decode worker replays the tokens so far into its grammar matcher (after the handoff,
    and after a failover recompute): the constrained greedy output is the offline one."""
    schema = {
        "type": "object",
        "properties": {"words": {"type": "array", "items": {"type": "string", "maxLength": 12}}},
        "required": ["words"],
        "additionalProperties": False,
    }
    prompt = random_prompt(3, 30)
    params = SamplingParams(
        max_tokens=64, temperature=0, ignore_eos=True, guided="json", guided_spec=json.dumps(schema)
    )
    want = cut_llm.generate([prompt], params)[0].outputs[0].text
    killed = []

    def kill_after_five(n):
        if n == 5 and not killed:
            killed.append(cluster.serving("decode"))
            cluster.kill(killed[0])

    text, error = cluster.stream(prompt, 64, on_chunk=kill_after_five, guided_json=schema)
    assert killed and error is None
    assert text == want


def test_when_no_decode_worker_is_left_the_stream_ends_with_an_error(cluster):
    # After the tests above one decode worker is left; kill it mid-stream too.
    live = [w for w, s in cluster.worker_states().items() if s["role"] == "decode"]
    live = [w for w in live if cluster.worker_states()[w]["state"] == "ready"]
    assert len(live) == 1
    killed_at = []

    def kill_after_three(n):
        if n == 3 and not killed_at:
            cluster.kill(live[0])
            killed_at.append(time.monotonic())

    text, error = cluster.stream(random_prompt(2, 30), 1000, on_chunk=kill_after_three)
    assert killed_at and error is not None, text
    assert time.monotonic() - killed_at[0] < 10  # noticed at once, never a hang
    assert "no worker is left" in error["message"]
    assert error["code"] and error["type"]
    # the error event is counted with its status, and both lost workers are
    page = httpx.get(cluster.url + "/metrics", timeout=10).text
    assert re.search(r'^baton:request_errors_total\{status="503"\} 1\.0$', page, re.M), page
    assert re.search(r"^baton:worker_losses_total 3\.0$", page, re.M), page
    assert re.search(r'^baton:workers\{role="decode",state="dead"\} 3\.0$', page, re.M), page
