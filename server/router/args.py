"""The router's command-line flags (`baton router`, `baton serve`) and the ServeConfig they
make."""

from __future__ import annotations

import argparse
import logging

from baton.scheduler.routing import POLICIES, RoutingConfig

logger = logging.getLogger(__name__)


def curve_keys(args):
    from baton.server.wire.curve import load_keys

    keys = load_keys(args.curve_key_file)
    logger.info("ZeroMQ links: %s", "CURVE (encrypted, authenticated)" if keys else "plain")
    return keys


def add_router_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key", help="/v1/* asks for `Authorization: Bearer KEY` (also: $BATON_API_KEY)"
    )
    p.add_argument("--api-key-file", help="the API key from this file's first line")
    p.add_argument(
        "--admin-key",
        help="/workers, /metrics, /docs, /openapi.json ask for this key instead of the API key "
        "(also: $BATON_ADMIN_KEY)",
    )
    p.add_argument("--admin-key-file", help="the admin key from this file's first line")
    p.add_argument(
        "--metrics-public",
        action="store_true",
        help="/metrics answers without a key (Prometheus can send one: see deploy/README.md)",
    )
    p.add_argument("--mode", default="disagg", choices=["disagg", "colocated"])
    p.add_argument(
        "--max-num-requests",
        type=int,
        default=4096,
        help="requests in flight at once; past it, 429 with Retry-After",
    )
    p.add_argument(
        "--request-timeout", type=float, default=None, help="seconds a request may take (504)"
    )
    p.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=10.0,
        help="seconds of silence before a worker is declared dead",
    )
    d = RoutingConfig()
    p.add_argument(
        "--routing",
        default=d.policy,
        choices=POLICIES,
        help="kv: by the prompt's cached blocks against queues; load: least loaded; round-robin",
    )
    p.add_argument(
        "--kv-load-weight",
        type=int,
        default=d.load_weight,
        help="kv routing: prompt tokens one queued request on a worker is worth",
    )
    p.add_argument(
        "--max-local-prefill-tokens",
        type=int,
        default=d.max_local_prefill_tokens,
        help="disagg: a decode worker prefills a prompt itself when at most this many of its "
        "tokens are not cached there (0: never)",
    )
    p.add_argument(
        "--max-local-turn-tokens",
        type=int,
        default=d.max_local_turn_tokens,
        help="disagg: ... or at most this many when it holds more of the prompt than the "
        "prefill worker would (a next turn of a conversation it answered)",
    )
    p.add_argument(
        "--prefill-backlog",
        type=int,
        default=d.prefill_backlog,
        help="disagg: decode workers prefill locally when every prefill worker has this many "
        "requests (0: never)",
    )


def access_config(args):
    """Who may call what (see baton.server.api.auth); ValueError on an unreadable key file."""
    from baton.server.api.auth import AccessConfig, read_key

    api = read_key(args.api_key, args.api_key_file, "BATON_API_KEY", "--api-key")
    admin = read_key(args.admin_key, args.admin_key_file, "BATON_ADMIN_KEY", "--admin-key")
    if args.api_key is not None or args.admin_key is not None:
        logger.warning("a key given as a flag shows in `ps`: prefer --api-key-file or the env")
    return AccessConfig(api_key=api, admin_key=admin, metrics_public=args.metrics_public)


def serve_config(args, control: str):
    from baton.server.router.cluster import RouterConfig
    from baton.server.router.main import ServeConfig

    return ServeConfig(
        model=args.model,
        load_format=args.load_format,
        host=args.host,
        port=args.port,
        access=access_config(args),
        max_model_len=args.max_model_len,
        block_size=args.block_size,
        router=RouterConfig(
            mode=args.mode,
            control=control,
            heartbeat_timeout_s=args.heartbeat_timeout,
            routing=RoutingConfig(
                policy=args.routing,
                load_weight=args.kv_load_weight,
                max_local_prefill_tokens=args.max_local_prefill_tokens,
                max_local_turn_tokens=args.max_local_turn_tokens,
                prefill_backlog=args.prefill_backlog,
            ),
            max_num_requests=args.max_num_requests,
            request_timeout_s=args.request_timeout,
            curve=curve_keys(args),
        ),
    )
