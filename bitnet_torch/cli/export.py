"""``bitnet-torch export``: export a checkpoint to another runtime (GGUF)."""

from __future__ import annotations

import argparse
import time

from ._common import _require_path

#: Which runtime runs which file: the ``export gguf --help`` epilog (measured: tests/test_native_interop.py).
_RUNTIME_TABLE = """\
which runtime runs which file (GGUF stores no activation: each runtime's graph for an arch hard-codes it):

  model hidden_act   arch (default)   bitnet.cpp                   upstream llama.cpp
  relu2 (BitNet b1.58) bitnet-b1.58   i2_s, tq2_0, tq1_0, f16      none (no squared-ReLU BitNet arch)
  silu (1bitLLM style) bitnet         i2_s, tq2_0, tq1_0, f16      tq2_0, tq1_0, f16 (no i2_s: type 36)

  bitnet-25 is bitnet.cpp's other squared-ReLU arch. An arch whose FFN is not the model's is refused
  (it would load and compute a different model) unless --allow-activation-mismatch. Every runtime needs a
  tied lm_head (tie_word_embeddings): an untied one is refused unless --allow-untied-head.
  --embedding-type q6_k (token_embd, the tied head, in ggml's Q6_K) runs in both runtimes with every type above.

reading the files back: i2_s (type 36) is not an upstream ggml type, so the stock gguf-py GGUFReader cannot
open it; bitnet_torch.formats.BitNetGGUFReader (or load_gguf / BitNetForCausalLM.from_gguf) reads every type.
"""


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
        overwrite=args.overwrite,
        allow_activation_mismatch=args.allow_activation_mismatch,
        allow_untied_head=args.allow_untied_head,
    )
    seconds = time.perf_counter() - started
    types = ", ".join(f"{n} {t.upper()}" for t, n in sorted(report.tensor_types.items()))
    print(f"wrote {report.path} ({report.n_bytes / 2**20:.2f} MiB, arch {report.arch!r}, tensors: {types}) "
          f"in {seconds:.1f}s")
    if report.verified_ternary_tensors:
        print(f"verified: {report.verified_ternary_tensors} ternary tensors read back bit-exactly")
    if report.runtimes:
        print(f"runs as this model ({report.activation} FFN) in: {', '.join(report.runtimes)}")
    for line in report.fallbacks + report.notes:
        print(f"note: {line}")
    return 0


#: ``bitnet_torch.formats.gguf_layout``'s GGUF_TYPES, GGUF_ARCHITECTURES and GGUF_EMBEDDING_TYPES, repeated here so
#: that the parser (``--help``, argument errors) imports neither torch nor gguf/numpy; tests/test_cli.py checks that
#: they agree.
GGUF_TYPES = ("i2_s", "tq2_0", "tq1_0", "f16")
GGUF_ARCHITECTURES = ("bitnet", "bitnet-b1.58", "bitnet-25")
GGUF_EMBEDDING_TYPES = ("f16", "f32", "q6_k")


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add the ``export`` subcommand to ``sub``."""
    p = sub.add_parser("export", help="export a checkpoint (GGUF)", description="Export a checkpoint to another runtime.")
    export_sub = p.add_subparsers(dest="format", metavar="FORMAT", required=True)

    g = export_sub.add_parser(
        "gguf", parents=[common], help="GGUF for bitnet.cpp (every type) and llama.cpp (tq1_0, tq2_0, f16; silu models)",
        description="Write a BitNet checkpoint (packed or master, Transformers layout) as one GGUF file with "
                    "its tokenizer; every ternary weight is read back and checked bit-exactly before the file "
                    "takes its name (an interrupted export leaves nothing behind).",
        epilog=_RUNTIME_TABLE, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g.add_argument("model_dir", help="checkpoint directory (config.json, safetensors, tokenizer.json)")
    g.add_argument("out", help="output .gguf path (never a file of the checkpoint; an existing file needs --overwrite)")
    g.add_argument("--type", choices=GGUF_TYPES, default="i2_s",
                   help="storage of the ternary projections: i2_s (bitnet.cpp only, 2 bits), tq2_0 (2.06 bits), "
                        "tq1_0 (1.69 bits), f16 (default: %(default)s)")
    g.add_argument("--arch", choices=GGUF_ARCHITECTURES, default=None,
                   help="architecture name (default: the one whose runtime graph computes the model's hidden_act: "
                        "relu2 -> bitnet-b1.58, silu -> bitnet)")
    g.add_argument("--allow-activation-mismatch", action="store_true",
                   help="write an --arch whose runtime FFN activation differs from the model's (the file then "
                        "computes a different model)")
    g.add_argument("--allow-untied-head", action="store_true",
                   help="write an untied lm_head as output.weight (only bitnet_torch reads it back: the runtimes' "
                        "bitnet arch refuses the file, bitnet-b1.58 ignores it and uses token_embd)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    g.add_argument("--pre-tokenizer", default=None, help="override tokenizer.ggml.pre (llama.cpp pre-tokenizer name)")
    g.add_argument("--embedding-type", choices=GGUF_EMBEDDING_TYPES, default="f16",
                   help="storage of token_embd, the tied head: f16, f32, or q6_k (ggml's 6.56-bit k-quant, lossy: "
                        "2.4x smaller than f16, less to read per token; rows must be a multiple of 256) "
                        "(default: %(default)s)")
    g.add_argument("--name", default=None, help="general.name (default: the directory name)")
    g.add_argument("--no-verify", action="store_true", help="skip reading the file back")
    g.add_argument("--standard-keys-only", action="store_true",
                   help="omit the bitnet_torch.* keys (original config.json, exact fp32 scales) that make a re-import exact")
    g.set_defaults(handler=run)
