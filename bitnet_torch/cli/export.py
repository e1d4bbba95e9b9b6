"""``bitnet-torch export``: export a checkpoint to another runtime (GGUF)."""

from __future__ import annotations

import argparse
import time

from ._common import _require_path


def run(args: argparse.Namespace) -> int:
    from ..export import export_gguf

    model_dir = _require_path(args.model_dir, "model directory", "dir")
    started = time.perf_counter()
    report = export_gguf(
        model_dir,
        args.out,
        args.type,
        arch=args.arch,
        pre_tokenizer=args.pre_tokenizer,
        embedding_type=args.embedding_type,
        name=args.name,
        verify=not args.no_verify,
        extra_metadata=not args.standard_keys_only,
    )
    seconds = time.perf_counter() - started
    types = ", ".join(f"{n} {t.upper()}" for t, n in sorted(report.tensor_types.items()))
    print(f"wrote {report.path} ({report.n_bytes / 2**20:.2f} MiB, arch {report.arch!r}, tensors: {types}) "
          f"in {seconds:.1f}s")
    if report.verified_ternary_tensors:
        print(f"verified: {report.verified_ternary_tensors} ternary tensors read back bit-exactly")
    for line in report.fallbacks + report.notes:
        print(f"note: {line}")
    return 0


#: ``bitnet_torch.export.gguf``'s GGUF_TYPES, GGUF_ARCHITECTURES and _DEFAULT_ARCH, repeated here so that the
#: parser (``--help``, argument errors) does not import torch; tests/test_cli.py checks that they agree.
GGUF_TYPES = ("i2_s", "tq2_0", "tq1_0", "f16")
GGUF_ARCHITECTURES = ("bitnet", "bitnet-b1.58", "bitnet-25")
_DEFAULT_ARCH = {"i2_s": "bitnet-b1.58", "tq2_0": "bitnet", "tq1_0": "bitnet", "f16": "bitnet"}


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add the ``export`` subcommand to ``sub``."""
    p = sub.add_parser("export", help="export a checkpoint (GGUF)", description="Export a checkpoint to another runtime.")
    export_sub = p.add_subparsers(dest="format", metavar="FORMAT", required=True)

    g = export_sub.add_parser(
        "gguf", parents=[common], help="GGUF for bitnet.cpp (i2_s) and llama.cpp (tq1_0, tq2_0, f16)",
        description="Write a BitNet checkpoint (packed or master, Transformers layout) as one GGUF file with "
                    "its tokenizer; every ternary weight is read back and checked bit-exactly.",
    )
    g.add_argument("model_dir", help="checkpoint directory (config.json, safetensors, tokenizer.json)")
    g.add_argument("out", help="output .gguf path")
    g.add_argument("--type", choices=GGUF_TYPES, default="i2_s",
                   help="storage of the ternary projections: i2_s (bitnet.cpp, 2 bits), tq2_0 (llama.cpp, 2.06 bits), "
                        "tq1_0 (llama.cpp, 1.69 bits), f16 (default: %(default)s)")
    g.add_argument("--arch", choices=GGUF_ARCHITECTURES, default=None,
                   help="architecture name (default: " + ", ".join(f"{t}: {a}" for t, a in _DEFAULT_ARCH.items()) + ")")
    g.add_argument("--pre-tokenizer", default=None, help="override tokenizer.ggml.pre (llama.cpp pre-tokenizer name)")
    g.add_argument("--embedding-type", choices=("f16", "f32"), default="f16", help="storage of embeddings (default: f16)")
    g.add_argument("--name", default=None, help="general.name (default: the directory name)")
    g.add_argument("--no-verify", action="store_true", help="skip reading the file back")
    g.add_argument("--standard-keys-only", action="store_true",
                   help="omit the bitnet_torch.* keys (original config.json, exact fp32 scales) that make a re-import exact")
    g.set_defaults(handler=run)
