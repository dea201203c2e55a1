"""Several models working together (issue 13).

    python benchmarks/collab_bench.py --live [--arith 32] [--code 16] [--seed 0]
        [--threads 1] [--out bench-out]

--live measures the collaboration strategies of tierroute.collab (cross-model agreement,
draft and review, best-of-n) against each single tier and the two-tier cascade, with the
real local models, on generated tasks with checkable answers; see collab_live.py for how.
Writes OUT/collab_live.md (the tables) and OUT/collab_live.jsonl (every answer).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def live(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import collab_live

    collab_live.live(args)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--live", action="store_true", help="run the live measurement")
    parser.add_argument("--out", default="bench-out")
    parser.add_argument("--seed", type=int, default=0)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import collab_live

    collab_live.add_arguments(parser)
    args = parser.parse_args()
    if not args.live:
        parser.error("say what to run: --live")
    live(args)


if __name__ == "__main__":
    main()
