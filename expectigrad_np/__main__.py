"""Command line: ``python -m expectigrad_np <command> [options]``.

Commands:
  bench   time the fused step against memory bandwidth, the NumPy reference
          and torch's fused Adam (see ``expectigrad_np.bench``)
"""
from __future__ import annotations

import argparse
import sys


def _bench(args):
    from . import bench
    return bench.main(args)


def _add_bench(subparsers):
    from . import bench
    p = subparsers.add_parser("bench", help="benchmark the fused step",
                              description=bench.__doc__.split("\n\n")[0])
    bench.add_arguments(p)
    p.set_defaults(func=_bench)


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m expectigrad_np",
                                     description="expectigrad_np command line")
    subparsers = parser.add_subparsers(dest="command", metavar="command")
    _add_bench(subparsers)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
