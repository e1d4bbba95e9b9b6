"""``bitnet-torch generate``: stream a completion or chat with a model (tokens/s at the end)."""

from __future__ import annotations

import argparse
import sys
import time

from ._common import CLIError, _require_path, _set_threads


def _load_for_generation(args: argparse.Namespace):
    """(model, tokenizer) for ``generate``: a checkpoint directory or a .gguf file (its embedded tokenizer
    unless --tokenizer)."""
    from transformers import AutoTokenizer

    model_path = _require_path(args.model, "model")
    int8_head = not args.no_int8_lm_head
    if model_path.is_file():
        if model_path.suffix != ".gguf":
            raise CLIError(f"{model_path} is a file but not a .gguf; pass a checkpoint directory or a GGUF file")
        from ..models import BitNetForCausalLM

        if args.tokenizer:
            tokenizer = AutoTokenizer.from_pretrained(_require_path(args.tokenizer, "tokenizer"))
        else:  # the vocabulary, merges, special tokens and chat template the runtimes read from the file
            from ..formats.gguf_tokenizer import tokenizer_from_gguf

            tokenizer = tokenizer_from_gguf(model_path)
        model = BitNetForCausalLM.from_gguf(model_path, quantize_lm_head=int8_head, quantize_embedding=int8_head)
    else:
        from ..models import BitNetForCausalLM

        _require_path(model_path / "config.json", "config.json of the model", "file")
        # The int8 head shares its tensor with the embedding when they are tied (the 2B-4T case): one int8 matrix.
        model = BitNetForCausalLM.from_pretrained(model_path, packed=True, quantize_lm_head=int8_head,
                                                  quantize_embedding=int8_head)
        tokenizer = AutoTokenizer.from_pretrained(_require_path(args.tokenizer or model_path, "tokenizer"))
    from .. import backend_info

    head = "int8" if type(model.lm_head).__name__.startswith("Int8") else "float"
    print(f"[{model_path.name}: {'packed' if model.is_packed else 'master'} projections, {head} lm_head, "
          f"kernels: {backend_info()['backend']}, decode: "
          f"{'compiled (--compile)' if args.compile else backend_info(model)['decode_path']}]", file=sys.stderr)
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
        from ..models import compiled_decode_kwargs

        if not getattr(args, "_decode_compiled", False):
            _compile_decode_step(model, inputs, kwargs["pad_token_id"], args.max_new_tokens)
            args._decode_compiled = True
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


def _compile_decode_step(model, inputs: dict, pad_token_id: int | None, max_new_tokens: int) -> None:
    """Compile the decode step before the timed generation, so that tokens/s measures decoding only.

    A short greedy generation with a cache of the same length as the real one (``compiled_decode_kwargs``
    rounds it up to a bucket) builds the graph that the timed call then reuses; it draws no random numbers.
    """
    import torch

    from ..models import compiled_decode_kwargs

    print("[compiling the decode step (first call ~1 min)...]", file=sys.stderr, flush=True)
    started = time.perf_counter()
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=min(3, max_new_tokens), do_sample=False, pad_token_id=pad_token_id,
                       **compiled_decode_kwargs(model, inputs["input_ids"], max_new_tokens))
    print(f"[compiled in {time.perf_counter() - started:.1f}s; not counted in the tokens/s below]", file=sys.stderr,
          flush=True)


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


def run(args: argparse.Namespace) -> int:
    if not args.chat and args.prompt is None:
        raise CLIError("give --prompt TEXT, or --chat for a conversation")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise CLIError(f"--temperature must be >= 0 (0: greedy) and --top-p in (0, 1], got {args.temperature} and {args.top_p}")
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


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add the ``generate`` subcommand to ``sub``."""
    p = sub.add_parser("generate", parents=[common], help="generate text or chat, streaming tokens",
                       description="Generate from a BitNet checkpoint (packed on load; int8 lm_head unless "
                                   "--no-int8-lm-head) or a .gguf file, streaming tokens; prints tokens/s at the end.")
    p.add_argument("model", help="checkpoint directory, or a .gguf file written by `bitnet-torch export gguf`")
    p.add_argument("--prompt", "-p", default=None, help="text to continue (with --chat: a single user turn)")
    p.add_argument("--chat", action="store_true", help="chat with the tokenizer's chat template (interactive without --prompt)")
    p.add_argument("--system", default=None, help="system message for --chat")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer directory (default: the model directory; for a .gguf, the tokenizer it embeds)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="sampling temperature (default: %(default)s, with --top-p: what a small model learned reads "
                        "better sampled than greedy, which repeats itself); 0 = greedy")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass when sampling (default: %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling (default: a different sample each run)")
    p.add_argument("--no-int8-lm-head", action="store_true",
                   help="keep the output head and the embedding in float (slower, more memory)")
    p.add_argument("--compile", action="store_true",
                   help="decode with a static KV cache and a torch.compile'd step: faster per token, but the first "
                        "call compiles (about a minute for a 2B model on 2 cores); worth it for long generations")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch")
    p.set_defaults(handler=run)
