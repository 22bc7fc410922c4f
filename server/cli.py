"""The `baton` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time

DEMO_FLAGS = ("--model", "--device", "--dtype")  # of the engine flags, what `demo` takes


def _demo(args: argparse.Namespace) -> int:
    from baton import LLM, SamplingParams

    llm = LLM(model=args.model, device=args.device, dtype=args.dtype)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0)
    prompts = args.prompt or ["What is the capital of France?", "Write a haiku about the sea."]
    t0 = time.perf_counter()
    outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
    dt = time.perf_counter() - t0
    for p, o in zip(prompts, outs, strict=True):
        print(
            json.dumps(
                {"prompt": p, "completion": o.text, "finish_reason": o.outputs[0].finish_reason},
                ensure_ascii=False,
            )
        )
    n = sum(o.num_generated_tokens for o in outs)
    print(f"{n} tokens in {dt:.2f} s ({n / dt:.1f} tok/s)", file=sys.stderr)
    return 0


def _keys(args: argparse.Namespace) -> int:
    from baton.server.wire import curve

    try:
        public_path, secret_path = curve.generate_keys(args.directory)
    except FileExistsError as e:
        print(f"baton keys: {e}", file=sys.stderr)
        return 1
    public = curve.load_keys(secret_path, env={}).public
    print(f"public key: {public_path}")
    print(f"secret key: {secret_path} (mode 0600; copy it to every host, share it with no one)")
    print("give the router and every worker the pair, as a file:")
    print(f"  {curve.ENV_SECRET_FILE}={shlex.quote(os.path.abspath(secret_path))}")
    print("or as two variables (z85 keys hold shell metacharacters, never a quote: keep them):")
    print(f"  {curve.ENV_PUBLIC}='{public.decode()}'")
    print(f"  {curve.ENV_SECRET}=<the secret-key value in {os.path.basename(secret_path)}>")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from baton.server.flags import ENGINE_FLAGS, MODEL_FLAGS, add_flags
    from baton.server.launch import add_subcommands

    parser = argparse.ArgumentParser(prog="baton", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="offline generation on a few chat prompts")
    add_flags(demo, [f for f in MODEL_FLAGS + ENGINE_FLAGS if f.name in DEMO_FLAGS])
    demo.add_argument("--max-tokens", type=int, default=48)
    demo.add_argument("--prompt", action="append", help="a user message (repeatable)")
    demo.set_defaults(func=_demo)
    add_subcommands(sub)
    keys = sub.add_parser("keys", help="write a CURVE key pair that secures a deployment's links")
    keys.add_argument("directory", help="where baton.key and baton.key_secret go")
    keys.set_defaults(func=_keys)
    # NOTE: `baton bench ...` is handed to its own parser in main (it has a `sweep` mode);
    # this entry only lists it in `baton --help`.
    sub.add_parser("bench", help="serving benchmark against any OpenAI-compatible server")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        from baton.bench.cli import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("BATON_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s",
    )
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
