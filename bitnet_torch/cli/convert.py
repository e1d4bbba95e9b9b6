"""``bitnet-torch convert``: full-precision Transformers model -> BitNet master; master -> packed."""

from __future__ import annotations

import argparse
from pathlib import Path

from .._atomic import atomic_directory
from ._common import CLIError, _require_path, _read_json, _set_threads


def _copy_tokenizer(src: Path, out: Path) -> bool:
    """Copy the tokenizer of ``src`` to ``out`` (through Transformers); False when ``src`` has none."""
    if not any((src / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return False
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return True


def run(args: argparse.Namespace) -> int:
    src = _require_path(args.src, "source model directory", "dir")
    config = _read_json(_require_path(src / "config.json", "config.json of the source model", "file"))
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise CLIError(f"output directory {out} is not empty (pass --overwrite to write into it)")
    _set_threads(args.threads)
    import torch

    from ..models import BitNetForCausalLM
    from ..models.checkpoint import stale_weight_files

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "auto": "auto"}[args.dtype]
    quant = config.get("quantization_config") or {}
    is_bitnet = config.get("model_type") == "bitnet"
    is_packed = is_bitnet and quant.get("quantization_mode", "offline") == "offline" and quant.get("quant_method") == "bitnet"
    target = args.to
    if target == "auto":
        target = "packed" if is_bitnet else "master"
    if is_packed and target == "master":
        raise CLIError(
            f"{src} is a packed checkpoint: its float master weights are gone, so it cannot become a master checkpoint"
        )
    if is_packed:
        raise CLIError(f"{src} is already packed; nothing to convert (use `bitnet-torch export gguf` for GGUF)")
    if is_bitnet and target == "master":
        raise CLIError(f"{src} is already a BitNet master checkpoint; use --to packed to pack it")
    if is_bitnet:
        what = "BitNet master -> packed"
        model = BitNetForCausalLM.from_pretrained(src, packed=True, dtype=dtype)
    else:
        from transformers import AutoModelForCausalLM

        from ..models import convert_llama_to_bitnet

        what = f"{config.get('model_type')} -> BitNet {target}"
        source = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
        try:
            model = convert_llama_to_bitnet(source)
        except (ValueError, TypeError, AttributeError) as exc:
            raise CLIError(f"cannot convert {src} ({config.get('model_type')}): {exc}") from exc
        if target == "packed":
            model.pack()
    # All or nothing: model and tokenizer are written beside `out` and replace it in one step once complete.
    with atomic_directory(out, drop_old=stale_weight_files()) as partial:
        model.save_pretrained(partial, packed=(target == "packed"))
        tokenizer = _copy_tokenizer(src, partial)
    print(f"converted {src} ({what}) -> {out}" + ("" if tokenizer else " (no tokenizer found to copy)"))
    if not is_bitnet and target == "master":
        print("next: keep training with the lambda warm-up (examples/convert_pretrained.py, LambdaWarmupCallback) before packing")
    return 0


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add the ``convert`` subcommand to ``sub``."""
    p = sub.add_parser("convert", parents=[common], help="full-precision model -> BitNet; master -> packed",
                       description="Convert a full-precision Transformers Llama-family model into a trainable BitNet "
                                   "master checkpoint (or straight to packed), or pack a BitNet master checkpoint. "
                                   "Packed -> master is impossible: the float weights are gone.")
    p.add_argument("src", help="source checkpoint directory")
    p.add_argument("out", help="output directory")
    p.add_argument("--to", choices=("auto", "master", "packed"), default="auto",
                   help="target form: auto = master for a full-precision model, packed for a BitNet master")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto", help="dtype to load with")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty output directory (its other files are kept; the new checkpoint "
                        "replaces the old one only once it is completely written)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch")
    p.set_defaults(handler=run)
