"""Decode tokens/s, prefill time and resident memory of BitNet models on CPU, with same-run baselines.

Variants (each measured in its own subprocess, one model per process, so RSS is clean):

* ``ours``            — bitnet_torch ``BitNetForCausalLM`` created directly packed (random ternary codes, no float
                        projection ever allocated), bf16 embedding/head (logits as Transformers');
* ``ours_int8head``   — the same with the int8 per-row head, sharing its int8 tensor with the embedding;
* ``ours_compiled``   — ``ours_int8head`` decoding as ``generate(**compiled_decode_kwargs(...))`` does: static KV
                        cache, ``torch.compile``'d decode step (compile time reported separately);
* ``ours_loaded``     — ours loaded from the packed checkpoint (``from_pretrained``, memory-mapped);
* ``hf_autobitlinear``— Transformers' own ``BitNetForCausalLM`` on the same packed checkpoint
                        (``autobitlinear``/offline: unpacks to bf16 at load, holds float ternary weights);
* ``hf_bitlinear``    — the same checkpoint read as ``linear_class: bitlinear`` (unpacks on every forward;
                        the weight file is shared, only the config differs — same compute, timing only);
* ``llama_bf16`` / ``llama_fp32`` — a dense ``LlamaForCausalLM`` of the same shape (fp32 of the 2B-4T shape is
                        10 GB and only runs with ``--include-fp32-2b``).

Prefill = one forward over a 128-token prompt with ``logits_to_keep=1`` (what ``generate()`` runs);
decode = one forward per token with the KV cache, median over the timed steps.

Shapes: ``100m`` (12 layers, hidden 768) and ``2b4t`` (SPEC §4). Weights are random (timing does not
depend on them). Memory bandwidth is measured in the same process before each block of timed decode steps
(the fastest of several multi-threaded streaming reads of a 256 MiB tensor, best of 3 each:
``memory_bandwidth.py``) and each block's median step time is compared with
``weight bytes read per token / bandwidth`` (the physical limit); the reported ratio is the median over the
blocks (the bandwidth of a shared machine drifts). Resident memory is read from /proc/self/status after the
model is built (and again after decoding: KV cache, compiled code).
Unless ``--no-int8-head-effect``, a tiny BitNet model is trained on the KJV corpus (a few minutes) and the
change of validation perplexity / logits from the int8 head (alone, and sharing the embedding) is reported.

Usage::

    python benchmarks/bench_generate.py                      # both shapes, all variants
    python benchmarks/bench_generate.py --shapes 100m --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VARIANTS = ("ours", "ours_int8head", "ours_compiled", "ours_loaded", "hf_autobitlinear", "hf_bitlinear", "llama_bf16", "llama_fp32")
SHAPES = ("100m", "2b4t")
PROMPT_LEN = 128


# ------------------------------------------------------------------------------------------------------
# Shared helpers (run in workers and orchestrator)
# ------------------------------------------------------------------------------------------------------


def shape_config(shape: str):
    from bitnet_torch.models import bitnet_b1_58_2b_4t_config

    if shape == "2b4t":
        return bitnet_b1_58_2b_4t_config()
    if shape == "100m":
        return bitnet_b1_58_2b_4t_config(
            vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
            num_attention_heads=12, num_key_value_heads=4, bos_token_id=1, eos_token_id=2,
        )
    raise ValueError(f"unknown shape {shape!r}")


def proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_bandwidth_gbs(mib: int = 256, repeats: int = 5) -> float:
    """The machine's read bandwidth now (GB/s): the fastest of memory_bandwidth.py's streaming-read probes."""
    from memory_bandwidth import read_bandwidth_gbs

    return read_bandwidth_gbs(mib * 2**20, repeats)[0]


# ------------------------------------------------------------------------------------------------------
# Worker: build one model, time it, print one JSON line
# ------------------------------------------------------------------------------------------------------


def _build(variant: str, shape: str, checkpoint: str):
    import torch
    import transformers

    from bitnet_torch.models import BitNetForCausalLM

    config = shape_config(shape)
    if variant in ("ours", "ours_int8head", "ours_compiled"):
        model = BitNetForCausalLM.from_config(config, packed=True, dtype=torch.bfloat16)
        if variant in ("ours_int8head", "ours_compiled"):
            model.quantize_output_layers(lm_head=True, embedding=True)
    elif variant == "ours_loaded":
        model = BitNetForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16)
    elif variant == "hf_autobitlinear":
        model = transformers.BitNetForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16)
    elif variant == "hf_bitlinear":
        model = transformers.BitNetForCausalLM.from_pretrained(checkpoint + "_bitlinear", dtype=torch.bfloat16)
    elif variant in ("llama_bf16", "llama_fp32"):
        dtype = torch.bfloat16 if variant == "llama_bf16" else torch.float32
        llama_config = transformers.LlamaConfig(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads, tie_word_embeddings=True,
            max_position_embeddings=config.max_position_embeddings, rope_parameters=dict(config.rope_parameters),
        )
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(llama_config).to(dtype)
        model.to_empty(device="cpu")
        with torch.no_grad():
            for param in model.parameters():
                param.uniform_(-0.02, 0.02)
        model.model.rotary_emb = type(model.model.rotary_emb)(llama_config)
        model.tie_weights()
    else:
        raise ValueError(f"unknown variant {variant!r}")
    return model.eval()


def _weight_bytes_per_token(model, variant: str) -> int:
    """Bytes of weights a decode step must stream: every projection and the head (not the embedding row)."""
    import torch

    from bitnet_torch.nn import Int8Linear, PackedBitLinear

    total = 0
    for name, module in model.named_modules():
        if isinstance(module, (PackedBitLinear, Int8Linear)):
            total += sum(b.numel() * b.element_size() for b in module.buffers(recurse=False))
        elif isinstance(module, torch.nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
        elif type(module).__name__ == "BitLinear" and variant == "hf_bitlinear":
            total += module.weight.numel() + module.weight_scale.numel() * module.weight_scale.element_size()
    return total


def _decode_blocks(step, token, cache, blocks: int, steps_per_block: int):
    """Timed decode: ``blocks`` blocks of ``steps_per_block`` steps, the read bandwidth measured before each block.

    The memory bandwidth of a shared machine drifts; pairing each block with its own measurement keeps the
    ratio to the physical limit meaningful. Returns (step times, [(bandwidth GB/s, block median s)]).
    """
    import torch

    step_times, pairs = [], []
    for _ in range(blocks):
        bandwidth = memory_bandwidth_gbs(repeats=3)
        block = []
        for _ in range(steps_per_block):
            start = time.perf_counter()
            out = step(token, cache)
            elapsed = time.perf_counter() - start
            cache = out[1]
            token = out[0].logits[:, -1:].argmax(-1)
            block.append(elapsed)
        step_times.extend(block)
        pairs.append((bandwidth, statistics.median(block)))
    return step_times, pairs


def _generate_decode_s_per_token(
    model, prompt, compiled: bool, short: int = 8, long: int = 40, repeats: int = 2
) -> float:
    """Decode time per token through ``model.generate()`` (greedy): (time(long) - time(short)) / (long - short).

    The difference cancels the prefill and the fixed costs; ``ours_compiled`` passes ``compiled_decode_kwargs``
    (already compiled by then: same cache length bucket, same shapes). Median over ``repeats`` pairs.
    """
    import torch

    from bitnet_torch.models import compiled_decode_kwargs

    def run(n: int) -> float:
        kwargs = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False)
        if compiled:
            kwargs.update(compiled_decode_kwargs(model, prompt, long))
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(prompt, **kwargs)
        return time.perf_counter() - start

    run(short)  # warm-up (for the compiled variant: compiles generate()'s own decode step)
    return statistics.median((run(long) - run(short)) / (long - short) for _ in range(repeats))


def run_worker(args: argparse.Namespace) -> None:
    import torch

    torch.manual_seed(0)
    torch._dynamo.config.cache_size_limit = 64
    rss_start = proc_status_bytes("VmRSS")
    model = _build(args.variant, args.shape, args.checkpoint)
    rss_model = proc_status_bytes("VmRSS")
    anon_model = proc_status_bytes("RssAnon")
    weight_bytes = _weight_bytes_per_token(model, args.variant)
    rss_peak_model = proc_status_bytes("VmHWM")
    vocab = model.config.vocab_size
    prompt = torch.randint(3, vocab, (1, PROMPT_LEN))
    compiled = args.variant == "ours_compiled"
    decode_tokens = args.decode_tokens
    blocks = 4 if decode_tokens >= 16 else 1
    prefill_times = []
    compile_s = None
    with torch.inference_mode():
        for repeat in range(args.prefill_repeats + 1):  # the first pass warms up (allocates)
            cache = None
            if compiled:  # generate() with compiled_decode_kwargs: static cache, eager prefill, compiled decode
                from bitnet_torch.models import compiled_decode_kwargs

                cache = compiled_decode_kwargs(model, prompt, decode_tokens + 8)["cache"]
            start = time.perf_counter()
            out = model(input_ids=prompt, cache=cache, use_cache=True, logits_to_keep=1)  # as generate() does
            elapsed = time.perf_counter() - start
            if repeat:
                prefill_times.append(elapsed)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        token = out.logits[:, -1:].argmax(-1)
        position = [PROMPT_LEN]
        if compiled:
            forward = torch.compile(model.forward, fullgraph=True, dynamic=False)

            def step(tok, kv):
                pos = torch.tensor([[position[0]]])
                position[0] += 1
                return forward(input_ids=tok, cache=kv, use_cache=True, position_ids=pos), kv

            start = time.perf_counter()
            first, cache = step(token, cache)
            compile_s = time.perf_counter() - start
            token = first.logits[:, -1:].argmax(-1)
        else:

            def step(tok, kv):
                result = model(input_ids=tok, cache=kv, use_cache=True)
                return result, result.cache

        for _ in range(2):  # warm-up steps
            first, cache = step(token, cache)
            token = first.logits[:, -1:].argmax(-1)
        step_times, pairs = _decode_blocks(step, token, cache, blocks, max(1, decode_tokens // blocks))
    ours = args.variant in ("ours", "ours_int8head", "ours_compiled")
    generate_s = _generate_decode_s_per_token(model, prompt, compiled) if ours else None
    rss_after = proc_status_bytes("VmRSS")
    from bitnet_torch import backend_info

    decode_s = statistics.median(step_times)
    bandwidth = statistics.median(bw for bw, _ in pairs)
    ratios = [block_s / (weight_bytes / (bw * 1e9)) for bw, block_s in pairs]
    result = {
        "variant": args.variant,
        "shape": args.shape,
        "threads": torch.get_num_threads(),
        "backend": backend_info().get("backend"),
        "cpu_isa": backend_info().get("cpu_isa"),
        "prefill_tokens": PROMPT_LEN,
        "prefill_s_median": statistics.median(prefill_times),
        "prefill_tokens_per_s": PROMPT_LEN / statistics.median(prefill_times),
        "decode_s_per_token_median": decode_s,
        "decode_tokens_per_s": 1.0 / decode_s,
        "decode_steps_timed": len(step_times),
        "generate_decode_s_per_token": generate_s,
        "generate_decode_tokens_per_s": None if generate_s is None else 1.0 / generate_s,
        "compile_s": compile_s,
        "weight_bytes_per_token": weight_bytes,
        "rss_model_bytes": rss_model,
        "rss_model_growth_bytes": rss_model - rss_start,
        "rss_anon_model_bytes": anon_model,
        "rss_peak_bytes": rss_peak_model,
        "rss_after_decode_bytes": rss_after,
        "bandwidth_gbs": bandwidth,
        "bandwidth_gbs_blocks": [bw for bw, _ in pairs],
        "bandwidth_limit_s_per_token": weight_bytes / (bandwidth * 1e9),
        "decode_vs_bandwidth_limit": statistics.median(ratios),
        "decode_vs_bandwidth_limit_blocks": ratios,
    }
    print("RESULT " + json.dumps(result), flush=True)


def run_int8_head_effect(args: argparse.Namespace) -> None:
    """Perplexity and logit change of the int8 head on a tiny BitNet model trained here on the KJV corpus.

    Random weights say nothing about perplexity (a random ternary network is chaotic: any input change
    moves its logits a lot), so a 2-layer model (hidden 128, BPE vocabulary 1024, tied embeddings) is
    trained for ``--int8-effect-steps`` steps, packed, and scored on held-out chapters with the float head,
    the int8 head, and the int8 head sharing its tensor with the embedding.
    """
    import torch
    import torch.nn.functional as F

    from bitnet_torch.data import load_text_splits, tokenize_documents, train_bpe_tokenizer
    from bitnet_torch.models import BitNetConfig, BitNetForCausalLM

    torch.manual_seed(0)
    splits = load_text_splits()
    tokenizer = train_bpe_tokenizer(splits.train, vocab_size=1024)
    block = 128

    def blocks(documents):
        stream = tokenize_documents(tokenizer, documents)
        return stream[: stream.numel() // block * block].reshape(-1, block)

    train_blocks, valid_blocks = blocks(splits.train), blocks(splits.validation)[:64]
    config = BitNetConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                          max_position_embeddings=block, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id)
    model = BitNetForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.05)
    for step in range(args.int8_effect_steps):
        batch = train_blocks[torch.randint(0, len(train_blocks), (16,))]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval().pack()

    def score(m):
        with torch.inference_mode():
            logits = torch.cat([m(valid_blocks[i:i + 16]).logits[:, :-1].float() for i in range(0, len(valid_blocks), 16)])
        return logits

    reference = score(model)
    targets = valid_blocks[:, 1:].reshape(-1)

    def compare(logits):
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets)
        kl = F.kl_div(logits.log_softmax(-1), reference.log_softmax(-1), log_target=True, reduction="sum")
        return {
            "perplexity": float(nll.exp()),
            "max_abs_logit_diff": float((logits - reference).abs().max()),
            "kl_per_token": float(kl) / targets.numel(),
            "top1_agreement": float((logits.argmax(-1) == reference.argmax(-1)).float().mean()),
        }

    float_head = compare(reference)
    model.quantize_output_layers(lm_head=True, embedding=False)
    int8_head = compare(score(model))
    model.quantize_output_layers(lm_head=True, embedding=True)
    shared = compare(score(model))
    result = {
        "variant": "int8_head_effect",
        "model": "2 layers, hidden 128, vocab 1024, trained on KJV",
        "train_steps": args.int8_effect_steps,
        "final_train_loss": loss.item(),
        "valid_tokens": int(targets.numel()),
        "logit_range": float(reference.abs().max()),
        "float_head": float_head,
        "int8_head": int8_head,
        "int8_head_and_shared_embedding": shared,
    }
    print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------------
# Orchestrator
# ------------------------------------------------------------------------------------------------------


def _run_subprocess(argv: list[str], timeout: float) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, env=env, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-1500:]}"}


def _write_checkpoint(shape: str, directory: str) -> None:
    """Random packed checkpoint (ours, created directly packed) plus a ``bitlinear``-config twin sharing its file."""
    import torch

    from bitnet_torch.models import BitNetForCausalLM

    model = BitNetForCausalLM.from_config(shape_config(shape), packed=True, dtype=torch.bfloat16)
    model.save_pretrained(directory)
    twin = directory + "_bitlinear"
    os.makedirs(twin, exist_ok=True)
    for name in os.listdir(directory):
        target = os.path.join(twin, name)
        if name == "config.json":
            config = json.load(open(os.path.join(directory, name)))
            config["quantization_config"]["linear_class"] = "bitlinear"
            json.dump(config, open(target, "w"), indent=2)
        elif not os.path.exists(target):
            os.symlink(os.path.join(directory, name), target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=SHAPES)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--include-fp32-2b", action="store_true", help="also run dense fp32 2B-4T (needs ~10 GB)")
    parser.add_argument("--no-int8-head-effect", action="store_true")
    parser.add_argument("--json", help="write all results to this file")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per variant")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--decode-tokens", type=int, default=16, help=argparse.SUPPRESS)
    parser.add_argument("--prefill-repeats", type=int, default=3, help=argparse.SUPPRESS)
    parser.add_argument("--int8-head-effect-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--int8-effect-steps", type=int, default=300, help="training steps of the int8-head model")
    args = parser.parse_args()
    if args.worker:
        run_worker(args)
        return
    if args.int8_head_effect_worker:
        run_int8_head_effect(args)
        return

    import torch

    results: dict = {"threads": torch.get_num_threads(), "runs": []}
    results["bandwidth_gbs_start"] = memory_bandwidth_gbs()
    print(f"memory bandwidth (read, {results['threads']} threads): {results['bandwidth_gbs_start']:.1f} GB/s", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_generate_") as tmp:
        for shape in args.shapes:
            checkpoint = os.path.join(tmp, shape)
            if any(v in args.variants for v in ("ours_loaded", "hf_autobitlinear", "hf_bitlinear")):
                _write_checkpoint(shape, checkpoint)
            big = shape == "2b4t"
            for variant in args.variants:
                if variant == "llama_fp32" and big and not args.include_fp32_2b:
                    continue
                slow = variant.startswith("hf_") or variant.startswith("llama")
                decode = 4 if (big and slow) else (24 if big else 32)
                repeats = 1 if (big and slow) else 3
                argv = ["--worker", "--variant", variant, "--shape", shape, "--checkpoint", checkpoint,
                        "--decode-tokens", str(decode), "--prefill-repeats", str(repeats)]
                result = _run_subprocess(argv, args.timeout)
                result.setdefault("variant", variant)
                result.setdefault("shape", shape)
                results["runs"].append(result)
                _print_run(result)
        if not args.no_int8_head_effect:
            effect = _run_subprocess(["--int8-head-effect-worker", "--int8-effect-steps", str(args.int8_effect_steps)],
                                     args.timeout)
            results["int8_head_effect"] = effect
            print("int8 head effect (tiny trained model): " + json.dumps(effect), flush=True)
    results["bandwidth_gbs_end"] = memory_bandwidth_gbs()
    _add_ratios(results)
    _print_summary(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")


def _print_run(r: dict) -> None:
    if "error" in r:
        print(f"[{r['shape']:>5}] {r['variant']:<17} FAILED: {r['error'][-400:]}", flush=True)
        return
    limit = r["bandwidth_limit_s_per_token"]
    compile_note = f", compiled in {r['compile_s']:.0f} s" if r.get("compile_s") else ""
    if r.get("generate_decode_s_per_token"):
        compile_note += f"; through generate(): {r['generate_decode_s_per_token'] * 1e3:.1f} ms/tok"
    print(
        f"[{r['shape']:>5}] {r['variant']:<17} prefill {PROMPT_LEN} tok {r['prefill_s_median'] * 1e3:8.1f} ms "
        f"({r['prefill_tokens_per_s']:7.1f} tok/s) | decode {r['decode_s_per_token_median'] * 1e3:8.1f} ms/tok "
        f"({r['decode_tokens_per_s']:6.2f} tok/s, {r['decode_vs_bandwidth_limit']:5.2f}x the "
        f"{limit * 1e3:.1f} ms limit: {r['weight_bytes_per_token'] / 1e9:.3f} GB at {r['bandwidth_gbs']:.1f} GB/s"
        f"{compile_note}) | RSS {r['rss_model_bytes'] / 2**30:.2f} GiB = {r['rss_model_bytes'] / 1e9:.2f} GB "
        f"(after decode {r['rss_after_decode_bytes'] / 1e9:.2f} GB)",
        flush=True,
    )


OURS = ("ours", "ours_int8head", "ours_compiled", "ours_loaded")


def _add_ratios(results: dict) -> None:
    """On each baseline row: how many times faster each of our variants decodes / prefills (same run, same shape).

    ``ours_decode_speedup`` / ``ours_prefill_speedup`` map our variant name -> baseline time / our time.
    """
    by_key = {(r["shape"], r["variant"]): r for r in results["runs"] if "error" not in r}
    for (shape, baseline), base in by_key.items():
        if baseline in OURS:
            continue
        ours_rows = {v: r for (s, v), r in by_key.items() if s == shape and v in OURS}
        base["ours_decode_speedup"] = {
            v: base["decode_s_per_token_median"] / r["decode_s_per_token_median"] for v, r in ours_rows.items()
        }
        base["ours_prefill_speedup"] = {v: base["prefill_s_median"] / r["prefill_s_median"] for v, r in ours_rows.items()}


def _print_summary(results: dict) -> None:
    print(f"\nsame-run ratios (threads={results['threads']}, bandwidth {results['bandwidth_gbs_start']:.1f} → "
          f"{results['bandwidth_gbs_end']:.1f} GB/s):")
    from report import describe_speedup  # benchmarks/report.py: 0.06 reads "17x slower", not "0.06x faster"

    for r in results["runs"]:
        for ours, decode in r.get("ours_decode_speedup", {}).items():
            print(f"  [{r['shape']:>5}] {ours:<14} vs {r['variant']:<17} decode {describe_speedup(decode)}, "
                  f"prefill {describe_speedup(r['ours_prefill_speedup'][ours])}")


if __name__ == "__main__":
    main()
