"""QAT training cost of BitLinear vs plain nn.Linear at the same model size: step time and memory.

    python benchmarks/bench_training.py                         # 5m preset shape, batch 16 x 256, fp32
    python benchmarks/bench_training.py --preset 15m --batch-size 8 --repeats 10 --threads 2

Both models are the BitNet b1.58 architecture (SubLN, squared-ReLU GLU, RoPE, GQA, tied embeddings):
``bitnet_torch.BitNetForCausalLM`` (the seven projections are BitLinear: ternary weights, int8 activations,
straight-through backward) and Transformers' own ``BitNetForCausalLM`` built from the same config without a
quantizer (the projections are plain ``nn.Linear``). Same initial weights.

Measured, interleaved in one process so that machine noise hits both alike:
* step time: forward + backward + AdamW step, median of ``--repeats`` after ``--warmup`` steps;
* saved activations: bytes of every tensor autograd keeps for backward during one forward (counted with
  ``torch.autograd.graph.saved_tensors_hooks``, parameters excluded, each storage once) — the part of
  training memory that scales with batch × sequence;
* peak RSS of one training step in a fresh subprocess per variant (``resource.getrusage``), minus the RSS
  before the step.
Ratios are BitLinear / nn.Linear; targets: step time <= 1.5x (goal 1.2x), memory <= 1.0x.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch


def build_models(preset: str, vocab: int, seq: int, seed: int = 0):
    import transformers

    from bitnet_torch.models import BitNetConfig, BitNetForCausalLM
    from bitnet_torch.training import get_preset

    kwargs = get_preset(preset).config_kwargs(vocab)
    kwargs["max_position_embeddings"] = max(kwargs["max_position_embeddings"], seq)
    common = dict(tie_word_embeddings=True, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    torch.manual_seed(seed)
    bitnet = BitNetForCausalLM(BitNetConfig(**kwargs, **common))
    dense = transformers.BitNetForCausalLM(transformers.BitNetConfig(**kwargs, **common))
    missing, unexpected = dense.load_state_dict(bitnet.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"state dicts differ: missing {missing}, unexpected {unexpected}")
    for name, m in dense.named_modules():
        if type(m).__name__ == "AutoBitLinear":
            raise RuntimeError(f"{name} is quantized in the dense baseline")
    return {"bitlinear": bitnet, "nn.Linear": dense}


def saved_activation_bytes(model, batch) -> int:
    """Bytes autograd saves for backward during one forward (parameters excluded, storages counted once)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def _rss_child(variant: str, preset: str, vocab: int, batch: int, seq: int, threads: int) -> None:
    import resource

    torch.set_num_threads(threads)
    model = build_models(preset, vocab, seq)[variant]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()  # allocate grads and optimizer state first
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with open("/proc/self/status") as f:
        current = next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_kib": peak, "before_kib": before, "current_kib": current}))


def peak_step_rss_mib(variant: str, args) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--rss-child", variant, "--preset", args.preset, "--vocab", str(args.vocab),
         "--batch-size", str(args.batch_size), "--seq", str(args.seq), "--threads", str(args.threads)],
        capture_output=True, text=True, check=True,
    )
    data = json.loads(out.stdout.strip().splitlines()[-1])
    return (data["peak_kib"] - data["current_kib"]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="5m")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        _rss_child(args.rss_child, args.preset, args.vocab, args.batch_size, args.seq, args.threads)
        return

    torch.set_num_threads(args.threads)
    import bitnet_torch

    info = bitnet_torch.backend_info()
    models = build_models(args.preset, args.vocab, args.seq)
    params = sum(p.numel() for p in models["bitlinear"].parameters())
    ids = torch.randint(0, args.vocab, (args.batch_size, args.seq), generator=torch.Generator().manual_seed(0))
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.9, 0.95)) for k, m in models.items()}
    print(f"preset {args.preset}: {params / 1e6:.2f}M parameters, batch {args.batch_size} x {args.seq} tokens, fp32, "
          f"{args.threads} threads, bitnet kernels: {info.get('backend')} ({info.get('cpu_isa')})")

    times: dict[str, list[float]] = {k: [] for k in models}
    for i in range(args.warmup + args.repeats):
        for name, model in models.items():  # interleaved: noise hits both
            start = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
    medians = {k: statistics.median(v) for k, v in times.items()}
    saved = {k: saved_activation_bytes(m, ids) / 2**20 for k, m in models.items()}
    rss = {k: peak_step_rss_mib(k, args) for k in models}
    for name in models:
        print(f"{name:>10}: step {medians[name] * 1e3:8.1f} ms (median of {args.repeats}, "
              f"min {min(times[name]) * 1e3:.1f}), saved activations {saved[name]:7.1f} MiB, "
              f"step peak RSS growth {rss[name]:7.1f} MiB")
    print(f"ratio BitLinear / nn.Linear: step time {medians['bitlinear'] / medians['nn.Linear']:.2f}x "
          f"(target <= 1.5x, goal 1.2x), saved activations {saved['bitlinear'] / saved['nn.Linear']:.2f}x, "
          f"peak RSS growth {rss['bitlinear'] / rss['nn.Linear']:.2f}x (target <= 1.0x)")


if __name__ == "__main__":
    main()
