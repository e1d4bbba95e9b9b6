"""``bitnet-torch``: one command line for the BitNet b1.58 workflow.

Subcommands (``bitnet-torch <command> --help`` explains each option)::

    train      train a model from scratch (paper recipe, two-stage schedule)
    finetune   LoRA fine-tuning with trl
    generate   stream a completion or chat with a model (tokens/s at the end)
    convert    full-precision Transformers model -> BitNet master; master -> packed
    export     export a checkpoint (``export gguf MODEL_DIR OUT.gguf --type i2_s``)
    bench      run the kernel and generation benchmarks, write a Markdown + PNG report
    serve      OpenAI-compatible HTTP server (continuous batching, limits, API keys, metrics)
    info       backend, CPU ISA, CUDA, versions, where the compiled extension lives

Errors are printed as one line (``error: ...``) with a non-zero exit code; ``--debug`` shows the traceback.
One module per command (``bitnet_torch/cli/<command>.py``: ``add_parser`` and ``run``); heavy libraries are
imported inside each command, after the arguments are parsed: ``bitnet-torch --help``, the help of every
command but ``train``/``finetune`` (whose options come from the training config dataclasses) and argument
errors never import torch or Transformers (``bitnet_torch/__init__.py`` defers them in this process).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from . import bench, convert, export, finetune, generate, info, serve, train
from ._common import CLIError

logger = logging.getLogger("bitnet_torch.cli")

_EXIT_ERROR = 1
_EXIT_INTERRUPTED = 130


def build_parser(heavy_options: bool = True) -> argparse.ArgumentParser:
    """The ``bitnet-torch`` argument parser (every subcommand and option, with help).

    ``heavy_options=False`` leaves out the options of ``train`` and ``finetune``, whose defaults come from
    ``bitnet_torch.training``'s config dataclasses (importing the training stack takes seconds): :func:`main`
    builds them only when the command is one of those two.
    """
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback on errors")
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                        help="more logging (-v info, -vv debug)")

    parser = argparse.ArgumentParser(
        prog="bitnet-torch",
        description="BitNet b1.58 (ternary weights, int8 activations) for PyTorch: train, fine-tune, generate, "
                    "convert, export to GGUF, benchmark.",
        epilog="Run `bitnet-torch COMMAND --help` for the options of a command.",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train.add_parser(sub, common, heavy_options)
    finetune.add_parser(sub, common, heavy_options)
    generate.add_parser(sub, common)
    convert.add_parser(sub, common)
    export.add_parser(sub, common)
    bench.add_parser(sub, common)
    info.add_parser(sub, common)
    serve.add_parser(sub, common)
    return parser


def _error_line(exc: BaseException) -> str:
    """One line for an exception: out-of-memory gets a hint, the rest their message."""
    import torch

    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in text.lower():
        return (f"out of memory ({text[:200]}); hint: use a smaller model/batch (--batch-size, --block-size, "
                "--max-new-tokens), fewer --threads, or --dtype bfloat16")
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
        return text
    if isinstance(exc, (CLIError, ValueError, TypeError, OSError, ImportError, KeyError, RuntimeError)):
        return text if not isinstance(exc, KeyError) else f"missing key {text}"
    return f"{type(exc).__name__}: {text}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``bitnet-torch`` and ``python -m bitnet_torch``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    heavy = command in ("train", "finetune")
    if heavy and "bitnet_torch.training" not in sys.modules:
        # The options of these two come from the training stack: say why the next seconds are silent.
        print("bitnet-torch: importing torch, Transformers and the bitnet kernels (seconds; the first run also "
              "compiles the kernels, 1-3 min)...", file=sys.stderr, flush=True)
    parser = build_parser(heavy_options=heavy)
    args = parser.parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        import bitnet_torch  # noqa: PLC0415 - the deferred public API (and the Auto classes) from here on

        bitnet_torch._import_api()
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return _EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the CLI turns every failure into one line
        if args.debug:
            raise
        print(f"error: {_error_line(exc)}", file=sys.stderr)
        return _EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
