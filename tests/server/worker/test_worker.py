"""One worker's loop driven by hand against sockets the test holds: what it reports when a
handoff ends, whether it went well or not."""

from __future__ import annotations

import time

import pytest
import zmq

from baton import SamplingParams
from baton.server.config import EngineConfig
from baton.server.wire import codec
from baton.server.wire import messages as m
from baton.server.worker.config import WorkerConfig
from baton.server.worker.worker import Worker

PROMPT = list(range(5, 45))  # 40 tokens: 3 blocks of 16
PARAMS = m.params_to_dict(SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))


@pytest.fixture
def sockets():
    """The router's control socket and a decode worker's KV socket, both played by the test."""
    ctx = zmq.Context()
    router, decode = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    for s in (router, decode):
        s.setsockopt(zmq.LINGER, 0)
    r_port = router.bind_to_random_port("tcp://127.0.0.1")
    d_port = decode.bind_to_random_port("tcp://127.0.0.1")
    yield router, f"tcp://127.0.0.1:{r_port}", decode, f"tcp://127.0.0.1:{d_port}"
    router.close()
    decode.close()
    ctx.term()


def prefill_worker(model: str, router_endpoint: str) -> Worker:
    engine = EngineConfig(
        model=model, load_format="dummy", seed=0, show_progress=False, detokenize=False
    )
    return Worker(WorkerConfig(role="prefill", router=router_endpoint, engine=engine))


def recv(sock: zmq.Socket, worker: Worker, timeout: float = 20.0):
    """The next message on `sock`, running the worker's loop while waiting."""
    deadline = time.monotonic() + timeout
    while not sock.poll(0):
        assert time.monotonic() < deadline, "the worker sent nothing"
        worker.run_once()
    frames = sock.recv_multipart()
    msg, payload = codec.decode(frames[1:])
    return frames[0], msg, payload


def control_messages(router: zmq.Socket, worker: Worker, until: type) -> list:
    msgs = []
    while not msgs or not isinstance(msgs[-1], until):
        msgs.append(recv(router, worker)[1])
    return msgs


def start(worker: Worker, decode_endpoint: str) -> None:
    worker._on_generate(m.Generate("r1", PROMPT, PARAMS, "decode-0", decode_endpoint))


def test_a_completed_handoff_reports_its_bytes(tiny_config_dir, sockets):
    router, r_end, decode, d_end = sockets
    w = prefill_worker(tiny_config_dir, r_end)
    try:
        start(w, d_end)
        peer, opened, _ = recv(decode, w)
        assert isinstance(opened, m.KVOpen) and opened.prompt_token_ids == PROMPT
        decode.send_multipart([peer, *codec.encode(m.KVOpenReply("r1", True, ""))])
        nbytes = 0
        while True:
            _, msg, payload = recv(decode, w)
            if isinstance(msg, m.KVDone):
                break
            nbytes += sum(p.nbytes for p in payload)
        decode.send_multipart([peer, *codec.encode(m.KVAck("r1", True, ""))])
        msgs = control_messages(router, w, until=m.KVReport)
        first = next(x for x in msgs if isinstance(x, m.TokenOutput))
        assert len(first.token_ids) == 1 and first.queue_time_s is not None
        report = msgs[-1]
        assert report.ok and report.nbytes == nbytes == 3 * w.engine.runner.kv_cache[0].nbytes
        assert 0 <= report.seconds < 20
        assert w.engine.batcher.block_manager.num_used_blocks == 0 and not w.outgoing
    finally:
        w.close()


@pytest.mark.parametrize("how", ["refused", "aborted", "nacked"])
def test_a_failed_handoff_is_reported_and_fails_the_request(tiny_config_dir, sockets, how):
    router, r_end, decode, d_end = sockets
    w = prefill_worker(tiny_config_dir, r_end)
    try:
        start(w, d_end)
        peer, _, _ = recv(decode, w)
        if how == "refused":
            reply = m.KVOpenReply("r1", False, "no free KV blocks right now")
        else:
            decode.send_multipart([peer, *codec.encode(m.KVOpenReply("r1", True, ""))])
            while not isinstance(recv(decode, w)[1], m.KVDone):
                pass
            reply = m.KVAbort("r1", "gone") if how == "aborted" else m.KVAck("r1", False, "bad")
        decode.send_multipart([peer, *codec.encode(reply)])
        msgs = control_messages(router, w, until=m.TokenOutput)
        while not any(isinstance(x, m.TokenOutput) and x.error for x in msgs):
            msgs += control_messages(router, w, until=m.TokenOutput)
        reports = [x for x in msgs if isinstance(x, m.KVReport)]
        assert len(reports) == 1 and not reports[0].ok
        assert msgs[-1].error and msgs[-1].finish_reason == "abort"
        assert w.engine.batcher.block_manager.num_used_blocks == 0 and not w.outgoing
        assert not w.engine.has_unfinished_requests()
    finally:
        w.close()
