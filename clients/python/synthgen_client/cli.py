"""`synthgen-client dataset` (also `synthgen dataset`): have a server generate a dataset and download it."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import httpx

from synthgen_client._calls import dataset_request
from synthgen_client.errors import SynthgenError
from synthgen_client.sync import Client


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="synthgen-client", description="A synthgen server's datasets, downloaded.")
    commands = parser.add_subparsers(dest="command", required=True)
    dataset = commands.add_parser("dataset", help="have a synthgen server generate a dataset and download it")
    dataset.add_argument("--server", default=os.environ.get("SYNTHGEN_SERVER", "http://127.0.0.1:8000"))
    dataset.add_argument("--api-key", default=None, help="or SYNTHGEN_API_KEY")
    dataset.add_argument("--model", required=True)
    dataset.add_argument("--per-class", type=int, default=None)
    dataset.add_argument("--n", type=int, default=None)
    dataset.add_argument("--label", default=None)
    dataset.add_argument("--seed", type=int, default=None)
    dataset.add_argument("--min-confidence", type=float, default=None)
    dataset.add_argument("--max-similarity", action="store_true")
    dataset.add_argument("--out", required=True, help="PATH.zip, PATH.tar or PATH.npz")
    return parser


def _out_problem(out: Path) -> str | None:
    """Why `--out` cannot take the dataset its suffix asks for (checked before the server does the work), or None."""
    kind = dataset_request(out, {})["format"]
    if kind == "tar":
        if out.exists() and not out.is_dir():
            return "it is a file, but a tar dataset is a folder of shards"
    elif not out.parent.is_dir():
        return f"there is no folder {out.parent} to write it in"
    elif out.is_dir():
        return f"it is a folder, but a {kind} dataset is one file"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    request = {key: value for key, value in (("per_class", args.per_class), ("n", args.n), ("label", args.label),
                                             ("seed", args.seed), ("min_confidence", args.min_confidence))
               if value is not None}
    if problem := _out_problem(Path(args.out)):
        print(f"synthgen dataset: --out {args.out}: {problem}", file=sys.stderr)
        return 2
    try:
        with Client(args.server, api_key=args.api_key or os.environ.get("SYNTHGEN_API_KEY")) as client:
            path = client.download_dataset(args.model, args.out, max_similarity=args.max_similarity, **request)
    except SynthgenError as exc:
        print(f"synthgen dataset: the server refused: {exc}", file=sys.stderr)
        return 2
    except httpx.TransportError as exc:
        print(f"synthgen dataset: cannot reach {args.server}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"synthgen dataset: cannot write {args.out}: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
