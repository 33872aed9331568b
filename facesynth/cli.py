"""``facesynth`` command line: dataset inspection and verification, job submission to a Ray cluster."""

from __future__ import annotations

import argparse
import json
import sys

from facesynth import shards, submit


def _info(args: argparse.Namespace) -> int:
    print(json.dumps(shards.summary(args.uri), indent=2))
    return 0


def _verify(args: argparse.Namespace) -> int:
    problems = shards.verify(args.uri)
    for p in problems:
        print(f"FAIL {p}")
    if not problems:
        s = shards.summary(args.uri)
        print(f"OK {s['shards']} shards, {s['rows']} rows re-hashed against the commit log of {args.uri}")
    return 1 if problems else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="facesynth",
        description="Synthetic face datasets on Ray. Jobs run as `python -m jobs.NAME --config X.yaml key=value`; "
        "this CLI inspects datasets (any URI: s3://bucket/prefix, file:///path or a path) and submits jobs "
        "to a Ray cluster (submit/status/logs/stop).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    ds = sub.add_parser("dataset", help="inspect a shard dataset").add_subparsers(
        dest="action", required=True
    )
    info = ds.add_parser("info", help="print counts from the commit log as JSON")
    info.add_argument("uri")
    info.set_defaults(func=_info)
    verify = ds.add_parser(
        "verify", help="re-hash every committed shard against the commit log (exit 1 on problems)"
    )
    verify.add_argument("uri")
    verify.set_defaults(func=_verify)
    submit.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit 0: OK; 1: verify found problems or a followed job did not succeed; 2: not a readable dataset or a
    refused submission (one ``error:`` line on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as exc:  # missing dataset, untrustworthy commit log
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
