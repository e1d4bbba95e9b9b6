"""``bitnet-torch``: one command line for the BitNet b1.58 workflow.

Subcommands (``bitnet-torch <command> --help`` explains each option)::

    train      train a model from scratch (paper recipe, two-stage schedule)
    finetune   LoRA fine-tuning with trl
    generate   stream a completion or chat with a model (tokens/s at the end)
    convert    full-precision Transformers model -> BitNet master; master -> packed
    export     export a checkpoint (``export gguf MODEL_DIR OUT.gguf --type i2_s``)
    bench      run the kernel and generation benchmarks, write a Markdown + PNG report
    info       backend, CPU ISA, CUDA, versions, where the compiled extension lives

Errors are printed as one line (``error: ...``) with a non-zero exit code; ``--debug`` shows the traceback.
Heavy libraries are imported inside each command, so ``--help`` stays quick.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["main", "build_parser", "CLIError"]

logger = logging.getLogger("bitnet_torch.cli")

_EXIT_ERROR = 1
_EXIT_INTERRUPTED = 130


class CLIError(Exception):
    """A user-facing failure: printed as one line, exit code 1."""


# ---------------------------------------------------------------------------------------------- helpers


def _require_path(path: str | Path, what: str, kind: str = "any") -> Path:
    """Return ``path`` as a Path or raise :class:`CLIError` naming what is missing."""
    p = Path(path)
    if not p.exists():
        raise CLIError(f"{what} not found: {p}")
    if kind == "dir" and not p.is_dir():
        raise CLIError(f"{what} must be a directory: {p}")
    if kind == "file" and not p.is_file():
        raise CLIError(f"{what} must be a file: {p}")
    return p


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CLIError(f"{path} is not valid JSON: {exc}") from exc


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _package_versions() -> dict[str, str | None]:
    from importlib import metadata

    versions: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("bitnet_torch", "torch", "transformers", "peft", "trl", "accelerate", "datasets", "safetensors",
                 "tokenizers", "gguf", "numpy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


# ------------------------------------------------------------------------------------------------- info


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    from . import _build, backend_info

    info: dict[str, Any] = {"backend": backend_info()}
    library = _build.loaded_library_path()
    sources = _build.source_dir()
    info["extension"] = {
        "loaded_library": str(library) if library else None,
        "sources": str(sources) if sources else None,
    }
    info["cuda"] = {
        "available": torch.cuda.is_available(),
        "torch_cuda": torch.version.cuda,
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }
    info["cpu"] = {
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    info["versions"] = _package_versions()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    for section, values in info.items():
        print(f"{section}:")
        for key, value in values.items():
            print(f"  {key:<22} {value}")
    return 0


# ----------------------------------------------------------------------------------------------- export


def _cmd_export_gguf(args: argparse.Namespace) -> int:
    from .export import export_gguf

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


# ---------------------------------------------------------------------------------------------- convert


def _copy_tokenizer(src: Path, out: Path) -> bool:
    """Copy the tokenizer of ``src`` to ``out`` (through Transformers); False when ``src`` has none."""
    if not any((src / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return False
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return True


def _cmd_convert(args: argparse.Namespace) -> int:
    src = _require_path(args.src, "source model directory", "dir")
    config = _read_json(_require_path(src / "config.json", "config.json of the source model", "file"))
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise CLIError(f"output directory {out} is not empty (pass --overwrite to write into it)")
    _set_threads(args.threads)
    import torch

    from .models import BitNetForCausalLM

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

        from .models import convert_llama_to_bitnet

        what = f"{config.get('model_type')} -> BitNet {target}"
        source = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
        try:
            model = convert_llama_to_bitnet(source)
        except (ValueError, TypeError, AttributeError) as exc:
            raise CLIError(f"cannot convert {src} ({config.get('model_type')}): {exc}") from exc
        if target == "packed":
            model.pack()
    model.save_pretrained(out, packed=(target == "packed"))
    tokenizer = _copy_tokenizer(src, out)
    print(f"converted {src} ({what}) -> {out}" + ("" if tokenizer else " (no tokenizer found to copy)"))
    if not is_bitnet and target == "master":
        print("next: keep training with the lambda warm-up (examples/convert_pretrained.py, LambdaWarmupCallback) before packing")
    return 0


# --------------------------------------------------------------------------------------------- generate


def _load_for_generation(args: argparse.Namespace):
    """(model, tokenizer) for ``generate``: a checkpoint directory or a .gguf file (+ --tokenizer)."""
    from transformers import AutoTokenizer

    model_path = _require_path(args.model, "model")
    int8_head = not args.no_int8_lm_head
    if model_path.is_file():
        if model_path.suffix != ".gguf":
            raise CLIError(f"{model_path} is a file but not a .gguf; pass a checkpoint directory or a GGUF file")
        if not args.tokenizer:
            raise CLIError("a .gguf model needs --tokenizer DIR (a directory with tokenizer.json)")
        from .export import model_from_gguf

        model = model_from_gguf(model_path, quantize_lm_head=int8_head, quantize_embedding=int8_head)
    else:
        from .models import BitNetForCausalLM

        _require_path(model_path / "config.json", "config.json of the model", "file")
        # The int8 head shares its tensor with the embedding when they are tied (the 2B-4T case): one int8 matrix.
        model = BitNetForCausalLM.from_pretrained(model_path, packed=True, quantize_lm_head=int8_head,
                                                  quantize_embedding=int8_head)
    tokenizer_path = _require_path(args.tokenizer or model_path, "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    from . import backend_info

    head = "int8" if type(model.lm_head).__name__.startswith("Int8") else "float"
    print(f"[{model_path.name}: {'packed' if model.is_packed else 'master'} projections, {head} lm_head, "
          f"kernels: {backend_info()['backend']}]", file=sys.stderr)
    return model.eval(), tokenizer


def _generate_once(model, tokenizer, inputs: dict, args: argparse.Namespace) -> tuple[str, dict[str, float]]:
    """Stream one completion to stdout; return the text and timing (prefill seconds, decode tokens/s)."""
    import torch
    from transformers import TextStreamer

    class TimedStreamer(TextStreamer):
        """TextStreamer that also records when the first and last new tokens arrive."""

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.times: list[float] = []

        def put(self, value):
            if not self.next_tokens_are_prompt:
                self.times.append(time.perf_counter())
            super().put(value)

    streamer = TimedStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    do_sample = args.temperature > 0
    kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=do_sample, streamer=streamer,
                  pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    if do_sample:
        kwargs.update(temperature=args.temperature, top_p=args.top_p)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    if args.compile:
        from .models import compiled_decode_kwargs

        kwargs.update(compiled_decode_kwargs(model, inputs["input_ids"], args.max_new_tokens))
    started = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(**inputs, **kwargs)
    finished = time.perf_counter()
    prompt_len = inputs["input_ids"].shape[-1]
    new_tokens = output[0, prompt_len:]
    stats = {"new_tokens": float(new_tokens.numel()), "total_s": finished - started}
    if streamer.times:
        stats["prefill_s"] = streamer.times[0] - started
        decode_s = streamer.times[-1] - streamer.times[0]
        stats["decode_tokens_per_s"] = (len(streamer.times) - 1) / decode_s if decode_s > 0 else float("nan")
    return tokenizer.decode(new_tokens, skip_special_tokens=True), stats


def _print_stats(stats: dict[str, float]) -> None:
    line = f"[{int(stats['new_tokens'])} tokens in {stats['total_s']:.2f}s"
    if "prefill_s" in stats:
        line += f"; prefill {stats['prefill_s'] * 1000:.0f} ms; decode {stats['decode_tokens_per_s']:.1f} tokens/s"
    print(line + "]", file=sys.stderr)


def _chat_inputs(tokenizer, messages: list[dict]) -> dict:
    if not getattr(tokenizer, "chat_template", None):
        raise CLIError("the tokenizer has no chat template; use --prompt without --chat")
    return dict(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                              return_dict=True))


def _cmd_generate(args: argparse.Namespace) -> int:
    if not args.chat and args.prompt is None:
        raise CLIError("give --prompt TEXT, or --chat for a conversation")
    _set_threads(args.threads)
    model, tokenizer = _load_for_generation(args)
    if not args.chat:
        inputs = dict(tokenizer(args.prompt, return_tensors="pt"))
        print(args.prompt, end="", flush=True)
        _, stats = _generate_once(model, tokenizer, inputs, args)
        _print_stats(stats)
        return 0
    messages: list[dict] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    turns = [args.prompt] if args.prompt is not None else None
    while True:
        if turns is not None:
            if not turns:
                return 0
            text = turns.pop(0)
        else:
            try:
                text = input("you> ")
            except EOFError:
                print()
                return 0
            if text.strip() in ("/exit", "/quit"):
                return 0
        messages.append({"role": "user", "content": text})
        print("assistant> ", end="", flush=True)
        reply, stats = _generate_once(model, tokenizer, _chat_inputs(tokenizer, messages), args)
        messages.append({"role": "assistant", "content": reply})
        _print_stats(stats)


# ------------------------------------------------------------------------------------------------ train


_TRAIN_HELP = {
    "output_dir": "where master/ and packed/ checkpoints (with the tokenizer) are written",
    "data": "corpus: 'kjv' (embedded King James Bible), text files/directories, a saved or named datasets dataset",
    "text_column": "column holding the text in a datasets dataset",
    "tokenizer": "reuse a saved tokenizer instead of training a byte-level BPE",
    "vocab_size": "vocabulary of the BPE tokenizer trained on the corpus",
    "preset": "model size preset (see bitnet_torch.training.PRESETS)",
    "block_size": "tokens per training sequence",
    "batch_size": "sequences per device per optimizer step",
    "gradient_accumulation_steps": "micro-batches per optimizer step",
    "max_steps": "maximum optimizer steps",
    "minutes": "time budget: calibrate the step count to finish the schedule within it",
    "learning_rate": "peak learning rate of stage 1 (BitNet uses several times a float model's)",
    "warmup_fraction": "fraction of steps for the linear warm-up",
    "weight_decay": "stage-1 weight decay",
    "stage2_weight_decay": "stage-2 weight decay",
    "boundary_fraction": "where stage 2 starts (fraction of the steps)",
    "stage2_peak_ratio": "stage-2 peak LR as a fraction of stage 1's",
    "eval_steps": "evaluate every N steps (0: only at the end)",
    "eval_blocks": "validation blocks per evaluation",
    "logging_steps": "log the loss every N steps",
    "seed": "random seed",
    "bf16": "train in bfloat16 autocast",
    "num_threads": "CPU threads for PyTorch",
    "save_master": "write the float master checkpoint",
    "save_packed": "write the packed checkpoint",
    "sample_prompt": "prompt of the sample generated at the end",
    "sample_tokens": "tokens of that sample",
    "disable_tqdm": "no progress bars",
}


def _add_dataclass_options(parser: argparse.ArgumentParser, cls: type, helps: dict[str, str]) -> None:
    """One ``--option`` per documented field of a config dataclass, defaults taken from the dataclass."""
    for f in dataclasses.fields(cls):
        if f.name not in helps:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        if kind in ("bool", "bool | None"):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                help=helps[f.name])
        elif kind.startswith("Literal["):
            parser.add_argument(flag, dest=f.name, choices=re.findall(r"[\"']([^\"']+)[\"']", kind), default=default,
                                help=f"{helps[f.name]} (default: %(default)s)")
        elif f.name == "data":
            parser.add_argument(flag, dest=f.name, nargs="+", default=default, help=helps[f.name])
        else:
            convert: Callable = int if kind.startswith("int") else float if kind.startswith("float") else str
            parser.add_argument(flag, dest=f.name, type=convert, default=default,
                                help=f"{helps[f.name]} (default: %(default)s)")


def _cmd_train(args: argparse.Namespace) -> int:
    from .training import TrainConfig, train_from_scratch

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    result = train_from_scratch(config)
    print(f"trained {result.num_parameters / 1e6:.2f}M parameters for {result.steps} steps "
          f"({result.tokens_seen} tokens) in {result.train_seconds:.1f}s")
    print(f"validation perplexity {result.validation_perplexity:.2f} (unigram baseline {result.unigram_perplexity:.2f})")
    if result.master_dir:
        print(f"master checkpoint: {result.master_dir}")
    if result.packed_dir:
        print(f"packed checkpoint: {result.packed_dir}")
    if result.reloaded_subset_perplexity is not None:
        print(f"reloaded with AutoModelForCausalLM.from_pretrained: perplexity {result.reloaded_subset_perplexity:.2f} "
              "on the evaluation subset; sample generated by the reloaded model:")
    if result.sample:
        print(f"sample: {result.sample}")
    return 0


# --------------------------------------------------------------------------------------------- finetune


_FINETUNE_HELP = {
    "output_dir": "where adapter/ (and merged-master/, merged-packed/) are written",
    "base": "master: LoRA next to the float master weights (can merge); packed: on the 2-bit codes (adapter only)",
    "merge": "merge the adapter into the master weights and re-quantize (master base only)",
    "dataset": "chat data with a 'messages' column: JSON/JSONL file, saved or named datasets dataset "
               "(default: a synthetic KJV question set)",
    "num_examples": "size of the synthetic KJV chat set",
    "r": "LoRA rank",
    "lora_alpha": "LoRA alpha",
    "lora_dropout": "LoRA dropout",
    "learning_rate": "peak learning rate",
    "max_steps": "optimizer steps",
    "batch_size": "sequences per step",
    "max_length": "tokens per example (longer ones are cut)",
    "logging_steps": "log the loss every N steps",
    "seed": "random seed",
    "sample_question": "question answered by the fine-tuned model at the end",
    "sample_tokens": "tokens of that answer",
    "disable_tqdm": "no progress bars",
    "bf16": "train in bfloat16 (default: only on a GPU that supports it)",
}


def _cmd_finetune(args: argparse.Namespace) -> int:
    from .training import FinetuneConfig, finetune_lora

    _require_path(args.model, "model directory", "dir")
    fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    config = FinetuneConfig(**{k: v for k, v in vars(args).items() if k in fields})
    result = finetune_lora(config)
    loss = "" if result.first_loss is None else f"; loss {result.first_loss:.3f} -> {result.final_loss:.3f}"
    print(f"fine-tuned {result.trainable_parameters / 1e6:.3f}M LoRA parameters ({result.base} base) for "
          f"{result.steps} steps in {result.train_seconds:.1f}s{loss}")
    print(f"adapter: {result.adapter_dir}")
    for label, path in (("merged master", result.merged_master_dir), ("merged packed", result.merged_packed_dir)):
        if path:
            print(f"{label}: {path}")
    print(f"sample: {result.sample}")
    return 0


# ------------------------------------------------------------------------------------------------ bench


def _benchmarks_dir(explicit: str | None) -> Path:
    """The benchmarks/ directory: --bench-dir, ./benchmarks, or the checkout this package lives in."""
    candidates = [Path(explicit)] if explicit else [Path.cwd() / "benchmarks", Path(__file__).resolve().parents[1] / "benchmarks"]
    for candidate in candidates:
        if (candidate / "report.py").is_file():
            return candidate
    raise CLIError(
        "benchmarks/ (with report.py) not found: run from a source checkout or pass --bench-dir "
        f"(looked in {', '.join(str(c) for c in candidates)})"
    )


#: Options that make a benchmark quick, used when its ``--help`` shows them and it has no ``--quick``.
_QUICK_FALLBACK = {
    "bench_generate": ["--shapes", "100m", "--no-int8-head-effect",
                       "--variants", "ours", "ours_int8head", "ours_compiled", "hf_autobitlinear", "llama_bf16"],
    "bench_linear": ["--shapes", "2560x2560,6912x2560", "--m", "1,128", "--repeats", "5", "--hf-repeats", "1"],
}


def _script_options(script: Path) -> str:
    """The ``--help`` text of a benchmark script (to pass only the options it has)."""
    completed = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=300)
    if completed.returncode != 0:
        raise CLIError(f"{script.name} --help failed: {completed.stderr.strip().splitlines()[-1:]}")
    return completed.stdout


def _benchmark_command(script: Path, json_path: Path, args: argparse.Namespace) -> list[str]:
    options = _script_options(script)
    if "--json" not in options:
        raise CLIError(f"{script.name} has no --json option: it cannot feed the report")
    cmd = [sys.executable, str(script), "--json", str(json_path)]
    if not args.full:
        if "--quick" in options:
            cmd.append("--quick")
        else:
            fallback = _QUICK_FALLBACK.get(script.stem, [])
            cmd += fallback if all(o in options for o in fallback if o.startswith("--")) else []
    if args.threads and "--threads" in options:
        cmd += ["--threads", str(args.threads)]
    return cmd


def _cmd_bench(args: argparse.Namespace) -> int:
    bench_dir = _benchmarks_dir(args.bench_dir)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: list[Path] = []
    missing: list[str] = []
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    for name in args.only or ("bench_linear", "bench_generate"):
        script = bench_dir / f"{name}.py"
        if not script.is_file():
            missing.append(name)
            continue
        json_path = out / f"{name}.json"
        cmd = _benchmark_command(script, json_path, args)
        print(f"running {' '.join(cmd)}", flush=True)
        completed = subprocess.run(cmd, env=env, cwd=bench_dir.parent)
        if completed.returncode != 0:
            raise CLIError(f"{script.name} failed with exit code {completed.returncode}")
        results.append(json_path)
    if not results:
        raise CLIError(f"no benchmark ran: {', '.join(missing)} not found in {bench_dir}")
    completed = subprocess.run([sys.executable, str(bench_dir / "report.py"), "--out", str(out), *map(str, results)],
                               env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        raise CLIError(f"report.py failed: {completed.stderr.strip().splitlines()[-1:]}")
    if missing:
        print(f"note: not run (script missing): {', '.join(missing)}")
    print(f"report: {out / 'report.md'}")
    return 0


# ----------------------------------------------------------------------------------------------- parser


def _unavailable(reason: str) -> Callable[[argparse.Namespace], int]:
    def handler(_args: argparse.Namespace) -> int:
        raise CLIError(reason)

    return handler


def _add_training_options(parser: argparse.ArgumentParser, config_name: str, helps: dict[str, str],
                          handler: Callable[[argparse.Namespace], int]) -> None:
    """Options from ``bitnet_torch.training.<config_name>``; if the training stack cannot import, the command
    still exists and says why it cannot run."""
    try:
        from . import training  # noqa: PLC0415 - seconds to import: only for train/finetune
    except ImportError as exc:
        parser.set_defaults(handler=_unavailable(f"the training stack is unavailable in this install: {exc}"))
        return
    _add_dataclass_options(parser, getattr(training, config_name), helps)
    parser.set_defaults(handler=handler)


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

    p = sub.add_parser("train", parents=[common], help="train a BitNet model from scratch",
                       description="Train a BitNet b1.58 causal LM from scratch with the paper recipe "
                                   "(AdamW 0.9/0.95, two-stage LR and weight decay) and save master + packed checkpoints.")
    if heavy_options:
        _add_training_options(p, "TrainConfig", _TRAIN_HELP, _cmd_train)

    p = sub.add_parser("finetune", parents=[common], help="LoRA fine-tuning with trl",
                       description="Fine-tune a BitNet checkpoint with LoRA adapters through trl's SFTTrainer on "
                                   "chat data; optionally merge into the master weights and re-pack.")
    p.add_argument("model", help="BitNet checkpoint directory with its tokenizer (e.g. bitnet-kjv/master)")
    if heavy_options:
        _add_training_options(p, "FinetuneConfig", _FINETUNE_HELP, _cmd_finetune)

    p = sub.add_parser("generate", parents=[common], help="generate text or chat, streaming tokens",
                       description="Generate from a BitNet checkpoint (packed on load; int8 lm_head unless "
                                   "--no-int8-lm-head) or a .gguf file, streaming tokens; prints tokens/s at the end.")
    p.add_argument("model", help="checkpoint directory, or a .gguf file written by `bitnet-torch export gguf`")
    p.add_argument("--prompt", "-p", default=None, help="text to continue (with --chat: a single user turn)")
    p.add_argument("--chat", action="store_true", help="chat with the tokenizer's chat template (interactive without --prompt)")
    p.add_argument("--system", default=None, help="system message for --chat")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model directory)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default), >0 samples")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass when sampling (default: %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--no-int8-lm-head", action="store_true",
                   help="keep the output head and the embedding in float (slower, more memory)")
    p.add_argument("--compile", action="store_true",
                   help="decode with a static KV cache and a torch.compile'd step: faster per token, but the first "
                        "call compiles (about a minute for a 2B model on 2 cores); worth it for long generations")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch")
    p.set_defaults(handler=_cmd_generate)

    p = sub.add_parser("convert", parents=[common], help="full-precision model -> BitNet; master -> packed",
                       description="Convert a full-precision Transformers Llama-family model into a trainable BitNet "
                                   "master checkpoint (or straight to packed), or pack a BitNet master checkpoint. "
                                   "Packed -> master is impossible: the float weights are gone.")
    p.add_argument("src", help="source checkpoint directory")
    p.add_argument("out", help="output directory")
    p.add_argument("--to", choices=("auto", "master", "packed"), default="auto",
                   help="target form: auto = master for a full-precision model, packed for a BitNet master")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto", help="dtype to load with")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty output directory")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch")
    p.set_defaults(handler=_cmd_convert)

    p = sub.add_parser("export", help="export a checkpoint (GGUF)", description="Export a checkpoint to another runtime.")
    export_sub = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
    from .export.gguf import _DEFAULT_ARCH, GGUF_ARCHITECTURES, GGUF_TYPES  # noqa: PLC0415

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
    g.set_defaults(handler=_cmd_export_gguf)

    p = sub.add_parser("bench", parents=[common], help="run the benchmarks and write a report",
                       description="Run benchmarks/bench_linear.py and bench_generate.py (quick mode unless --full) "
                                   "and write report.md (tables, machine info) and report.png into --out.")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--full", action="store_true", help="full benchmark sizes instead of the quick mode")
    p.add_argument("--only", nargs="+", choices=("bench_linear", "bench_generate"), default=None,
                   help="run only these benchmarks")
    p.add_argument("--threads", type=int, default=None, help="threads for the benchmarks")
    p.add_argument("--bench-dir", default=None, help="benchmarks directory (default: ./benchmarks or the checkout's)")
    p.set_defaults(handler=_cmd_bench)

    p = sub.add_parser("info", parents=[common], help="backend, ISA, CUDA, versions, extension location",
                       description="Print which kernels back torch.ops.bitnet and the environment.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=_cmd_info)
    return parser


# ------------------------------------------------------------------------------------------------- main


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
    parser = build_parser(heavy_options=command in ("train", "finetune"))
    args = parser.parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
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
