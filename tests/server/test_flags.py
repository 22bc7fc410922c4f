"""The flags `serve` and `worker` share: declared once, and a spawned worker gets serve's values."""

from __future__ import annotations

import shlex

from baton.server.cli import build_parser
from baton.server.config import EngineConfig
from baton.server.flags import ENGINE_FLAGS, FORWARDED, MODEL_FLAGS
from baton.server.launch import _engine_config, worker_command

SERVE = shlex.split(
    "serve --model tiny --load-format dummy --max-model-len 512 --block-size 32 --device cpu "
    "--dtype bfloat16 --kv-cache-gib 0.5 --gpu-memory-utilization 0.5 --max-num-seqs 7 "
    "--max-num-batched-tokens 1024 --seed 3 --attention-backend torch --enforce-eager "
    "--cpu-linear mkl-packed --threads 2 --thread-wait-policy passive --cpus 0-1 "
    "--drain-timeout 5 --kv-timeout 6 --curve-key-file keys/baton.key_secret"
)


def test_a_worker_that_serve_starts_gets_every_flag_it_was_given():
    parser = build_parser()
    serve = parser.parse_args(SERVE)
    assert {f.name for f in FORWARDED} <= set(SERVE)  # the test sets every forwarded flag
    cmd = worker_command(serve, "decode", "tcp://127.0.0.1:9", 0, 2)
    worker = parser.parse_args(cmd[cmd.index("worker") :])
    for f in FORWARDED:
        assert getattr(worker, f.dest) == getattr(serve, f.dest), f.name
    assert (worker.role, worker.router, worker.workers_on_device) == (
        "decode",
        "tcp://127.0.0.1:9",
        2,
    )
    cfg = _engine_config(worker)
    assert (cfg.attention_backend, cfg.cuda_graphs, cfg.gpu_memory_utilization) == (
        "torch",
        False,
        0.5,
    )
    # a worker's own cores replace --cpus
    cmd = worker_command(serve, "decode", "tcp://127.0.0.1:9", 0, 2, cpus="1")
    assert parser.parse_args(cmd[cmd.index("worker") :]).cpus == "1"


def test_defaults_come_from_the_engine_config_and_survive_forwarding():
    parser = build_parser()
    serve = parser.parse_args(["serve"])
    cmd = worker_command(serve, "both", "tcp://127.0.0.1:9", 0, 2)
    worker = parser.parse_args(cmd[cmd.index("worker") :])
    assert vars(worker).items() >= {f.dest: getattr(serve, f.dest) for f in FORWARDED}.items()
    cfg, default = _engine_config(worker, num_on_device=2), EngineConfig()
    for f in MODEL_FLAGS + ENGINE_FLAGS:
        if f.config_field not in (None, "gpu_memory_utilization"):
            assert getattr(cfg, f.config_field) == getattr(default, f.config_field), f.name
    assert cfg.gpu_memory_utilization == 0.425  # two workers share the device
