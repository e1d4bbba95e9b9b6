"""``python -m bitnet_torch.serving MODEL [options]``: the same as ``bitnet-torch serve``."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    """Parse the ``serve`` options and run the server; returns the exit code."""
    from .server import run_from_args

    parser = argparse.ArgumentParser(prog="python -m bitnet_torch.serving",
                                     description="OpenAI-compatible server for a BitNet model.")
    from .config import add_serve_arguments

    add_serve_arguments(parser)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return run_from_args(args)
    except (OSError, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
