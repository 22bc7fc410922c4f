"""Writes the synthetic multi-turn conversation set `baton bench --dataset conversations` uses.

python benchmarks/make_conversations.py                 # benchmarks/data/conversations.jsonl
"""

from __future__ import annotations

import argparse
import json

from baton.bench.datasets import DEFAULT_CONVERSATIONS, make_conversations


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--num", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=str(DEFAULT_CONVERSATIONS))
    args = p.parse_args()
    lines = [json.dumps(c) for c in make_conversations(args.num, args.seed)]
    with open(args.output, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {len(lines)} conversations to {args.output}")


if __name__ == "__main__":
    main()
