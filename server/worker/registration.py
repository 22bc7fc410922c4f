"""A worker joining the router: what it says about itself, and waiting for the answer."""

from __future__ import annotations

import logging
import os
import time

import torch
import zmq

from baton.server.host_cpu import format_cpu_list, usable_cpus
from baton.server.wire import codec
from baton.server.wire import messages as m
from baton.server.worker.config import WorkerConfig

logger = logging.getLogger(__name__)


class RegistrationError(RuntimeError):
    """The router refused this worker, or never answered its registration."""


def register_message(config: WorkerConfig, engine, kv_endpoint: str) -> m.Register:
    """`engine` is the worker's LLMEngine."""
    return m.Register(
        worker_id=config.worker_id,
        role=config.role,
        pid=os.getpid(),
        host=config.kv_host,
        model=engine.model_name,
        layout=engine.kv_layout,
        kv_endpoint=kv_endpoint,
        max_model_len=engine.max_model_len,
        num_blocks=engine.cache_config.num_blocks,
        cpu=_cpu(config, engine),
    )


def _cpu(config: WorkerConfig, engine) -> m.WorkerCPU | None:
    if engine.device.type != "cpu":
        return None
    plan = config.threads
    return m.WorkerCPU(
        threads=torch.get_num_threads(),
        wait_policy=plan.wait_policy if plan is not None else "torch's default",
        cpus=format_cpu_list(plan.cpus if plan is not None else usable_cpus()),
        linear=engine.cpu_linear,
    )


def await_acceptance(ctrl: zmq.Socket, config: WorkerConfig) -> None:
    """Wait for the router's RegisterReply; RegistrationError if it refuses or never answers."""
    deadline = time.monotonic() + config.register_timeout_s
    while time.monotonic() < deadline:
        if not ctrl.poll(200):
            continue
        frames = ctrl.recv_multipart(copy=False)
        try:
            reply, _ = codec.decode(frames)
        except codec.WireError as e:
            _check_router_version(frames)
            logger.warning("dropped a malformed frame from the router: %s", e)
            continue
        if isinstance(reply, m.RegisterReply):
            if not reply.accepted:
                raise RegistrationError(f"the router refused this worker: {reply.reason}")
            return
    raise RegistrationError(f"no answer from the router at {config.router}")


def _check_router_version(frames) -> None:
    """A router of another protocol version answers a Register in its own version (one that
    knows this worker's answers in this worker's): stop with both versions named."""
    try:
        name, version = codec.peek(frames)
    except codec.WireError:
        return
    if name == m.RegisterReply.TYPE and version != codec.PROTOCOL_VERSION:
        raise RegistrationError(
            f"the router speaks protocol version {version}, this worker "
            f"{codec.PROTOCOL_VERSION}: run the same Baton version on both"
        )
