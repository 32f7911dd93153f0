"""Command line: ``python -m expectigrad_np {demo,bench} [options]``."""
from __future__ import annotations

import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m expectigrad_np",
        description="Expectigrad on NumPy arrays with fused Numba kernels.")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("demo", help="the Reddi et al. counterexample and a small model",
                   add_help=True)
    sub.add_parser("bench", help="time the fused step (see 'bench --help')",
                   add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        parser.print_help()
        return 0
    if args.command == "demo":
        if rest:
            parser.error(f"demo takes no options, got {' '.join(rest)}")
        from .demo import main as demo_main
        return demo_main()
    from .bench import main as bench_main
    return bench_main(rest)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:          # e.g. piped into `head`: stop quietly
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
