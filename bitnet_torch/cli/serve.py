"""``bitnet-torch serve``: an OpenAI-compatible HTTP server for a model (see ``bitnet_torch.serving``)."""

from __future__ import annotations

import argparse

from ._common import CLIError


def run(args: argparse.Namespace) -> int:
    try:
        from ..serving.server import run_from_args
    except ImportError as exc:
        raise CLIError(f"serving needs the 'serve' extra: pip install 'bitnet_torch[serve]' ({exc})") from exc
    return run_from_args(args)


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add the ``serve`` subcommand to ``sub``."""
    from ..serving.config import add_serve_arguments

    p = sub.add_parser("serve", parents=[common], help="serve a model over the OpenAI API (HTTP)",
                       description="OpenAI-compatible server (/v1/chat/completions, /v1/completions, /v1/models, "
                                   "/health, /ready, /metrics) with continuous batching, limits, API keys and "
                                   "Prometheus metrics. Binds to 127.0.0.1 unless --host says otherwise; SIGTERM "
                                   "drains in-flight requests and exits 0.")
    add_serve_arguments(p)
    p.set_defaults(handler=run)
