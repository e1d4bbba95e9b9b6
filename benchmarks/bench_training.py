"""QAT training cost of BitLinear vs plain nn.Linear, per CPU instruction set: step time, saved activations, peak memory.

    python benchmarks/bench_training.py --threads 2                  # every ISA this CPU has, full run
    python benchmarks/bench_training.py --threads 2 --quick --json out.json
    python benchmarks/bench_training.py --isa avx2 --threads 2        # one ISA

Each ISA runs in its own subprocess with every library forced onto it, so an AVX-512 machine also measures what an
AVX2-only (or SIMD-less) CPU runs:

* ``avx2``:   ``BITNET_TORCH_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2``
* ``avx512``: ``BITNET_TORCH_CPU_ISA=avx512 ATEN_CPU_CAPABILITY=avx512`` (oneDNN and MKL unrestricted)
* ``amx``:    ``BITNET_TORCH_CPU_ISA=amx`` (AVX-512 otherwise)
* ``scalar``: ``BITNET_TORCH_CPU_ISA=scalar ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41
  MKL_ENABLE_INSTRUCTIONS=SSE4_2``

What ran is recorded, not assumed: our kernels' ISA, ATen's capability, oneDNN's ISA (from its verbose log) and the
path BitLinear's forward took for the integer product (``bitnet_torch.nn.bitlinear.matmul_path``).

Two workloads, both fp32, the baseline measured in the same process, interleaved with the BitLinear variant:

* ``model``: the README main job's model (``bitnet-torch train`` defaults: preset ``5m``, vocab 4096, batch 16 x 256).
  ``bitnet_torch.BitNetForCausalLM`` (the seven projections are BitLinear) against Transformers' own
  ``BitNetForCausalLM`` from the same config without a quantizer (the projections are ``nn.Linear``), same initial
  weights; one step = forward + backward + AdamW step. Without ``--quick`` also a float ``LlamaForCausalLM`` of the
  same sizes (tied embeddings), as a new user would compare.
* ``layer``: one 2560 x 6912 projection (the 2B-4T MLP shape), input 8 x 256 tokens, forward + backward.
  Without ``--quick`` also BitLinear with each other exact forward path forced (``fp32_gemm``, ``int_mm``), which is
  how the automatic choice was made. ``torch._int_mm`` runs through oneDNN only on CPUs with AVX-512 VNNI (a hardware
  check that ``ONEDNN_MAX_CPU_ISA`` does not change); elsewhere it is a plain loop. The ``avx2`` child therefore
  times the ``int_mm`` path with ``torch.backends.mkldnn.enabled = False``, which reaches that loop.

Reported per workload: step time (median of ``--repeats`` after ``--warmup``), the ratio BitLinear / nn.Linear
(target <= 1.2x), bytes autograd saves for backward during one forward (parameters excluded, each storage once:
the part of training memory that scales with batch x sequence; target below nn.Linear's), and the peak RSS growth
of one step in a fresh process per variant. The machine's load average is printed beside the figures.
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

ISA_ENV: dict[str, dict[str, str]] = {
    "scalar": {"BITNET_TORCH_CPU_ISA": "scalar", "ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41",
               "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
    "avx2": {"BITNET_TORCH_CPU_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "avx512": {"BITNET_TORCH_CPU_ISA": "avx512", "ATEN_CPU_CAPABILITY": "avx512"},
    "amx": {"BITNET_TORCH_CPU_ISA": "amx", "ATEN_CPU_CAPABILITY": "avx512"},
}
LAYER_SHAPE = (2560, 6912)  # in_features, out_features
LAYER_TOKENS = (8, 256)  # batch, sequence


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


# ----------------------------------------------------------------------------------------------- workloads


def build_models(preset: str, vocab: int, seq: int, with_llama: bool, seed: int = 0) -> dict:
    """The BitLinear model and its nn.Linear twins (same config and initial weights), by variant name."""
    import torch
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
    models = {"bitlinear": bitnet, "nn.Linear": dense}
    if with_llama:
        llama_kwargs = {k: v for k, v in kwargs.items() if k != "rope_parameters"}
        models["llama"] = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(**llama_kwargs, rope_theta=kwargs["rope_parameters"]["rope_theta"], **common)
        )
    return models


class ModelStep:
    """One optimizer step (forward + backward + AdamW) of a causal LM on a fixed batch."""

    def __init__(self, model, ids):
        import torch

        self.model, self.ids = model, ids
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))

    def forward(self):
        return self.model(input_ids=self.ids, labels=self.ids).loss

    def backward(self, loss) -> None:
        loss.backward()
        self.model.zero_grad(set_to_none=True)

    def __call__(self) -> None:
        self.forward().backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class LayerStep:
    """Forward + backward (a fixed output gradient) of one linear layer; grads dropped after each step."""

    def __init__(self, layer, x, path: str | None = None):
        import torch

        self.layer, self.x, self.path = layer, x, path
        self.grad = torch.randn(x.shape[:-1] + (layer.out_features,), generator=torch.Generator().manual_seed(1))

    def forward(self):
        from bitnet_torch.nn import bitlinear

        bitlinear.force_matmul_path(self.path)
        try:
            return self.layer(self.x)
        finally:
            bitlinear.force_matmul_path(None)

    def backward(self, out) -> None:
        out.backward(self.grad)
        self.layer.zero_grad(set_to_none=True)
        self.x.grad = None

    def __call__(self) -> None:
        self.backward(self.forward())


def build_layer_steps(isa: str, all_paths: bool) -> dict:
    import torch
    from torch import nn

    from bitnet_torch import BitLinear

    k, n = LAYER_SHAPE
    torch.manual_seed(0)
    dense = nn.Linear(k, n, bias=False)
    bit = BitLinear(k, n, bias=False)
    with torch.no_grad():
        bit.weight.copy_(dense.weight)
    x = torch.randn(*LAYER_TOKENS, k, requires_grad=True)
    steps = {"bitlinear": LayerStep(bit, x), "nn.Linear": LayerStep(dense, x)}
    if all_paths:
        steps["bitlinear[fp32_gemm]"] = LayerStep(bit, x, "fp32_gemm")
        steps["bitlinear[int_mm]"] = LayerStep(bit, x, "int_mm")
    return steps


def saved_activation_bytes(step, params) -> int:
    """Bytes autograd saves for backward during one forward (parameters excluded, storages counted once)."""
    import torch

    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_ptrs:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = step.forward()
    step.backward(out)
    return sum(seen.values())


def time_steps(steps: dict, warmup: int, repeats: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and process-CPU seconds per step of each variant, interleaved so that machine noise hits all alike.

    The CPU time (all threads of this process) is the less load-sensitive figure on a shared machine: time spent
    waiting for a core does not count (OpenMP's spin-waiting does).
    """
    wall: dict[str, list[float]] = {k: [] for k in steps}
    cpu: dict[str, list[float]] = {k: [] for k in steps}
    for i in range(warmup + repeats):
        for name, step in steps.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            step()
            if i >= warmup:
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu


# ------------------------------------------------------------------------------------------ what ran where


def onednn_isa() -> str:
    """oneDNN's ISA as its verbose log names it (one tiny int8 GEMM, stdout captured at the file descriptor)."""
    import torch

    with tempfile.TemporaryFile(mode="w+") as log:
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(log.fileno(), 1)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                torch._int_mm(torch.ones(32, 64, dtype=torch.int8), torch.ones(64, 32, dtype=torch.int8))
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        log.seek(0)
        for line in log:
            if ",isa:" in line:
                return line.strip().split(",isa:", 1)[1]
    return "unknown (no oneDNN verbose line)"


def what_ran() -> dict:
    import torch

    import bitnet_torch
    from bitnet_torch import BitLinear
    from bitnet_torch.nn import bitlinear

    k, n = LAYER_SHAPE
    x = torch.randn(4, k)
    model_shape = torch.randn(4, 256)
    return {
        "bitnet_kernels": bitnet_torch.backend_info().get("cpu_isa"),
        "aten_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_isa": onednn_isa(),
        "mkl_instructions": os.environ.get("MKL_ENABLE_INSTRUCTIONS", "unrestricted"),
        "bitlinear_path_layer": bitlinear.matmul_path(x, BitLinear(k, n, device="meta").weight, 8, torch.float32),
        "bitlinear_path_model": bitlinear.matmul_path(model_shape, torch.empty(688, 256), 8, torch.float32),
        "env": {key: os.environ[key] for key in sorted(ISA_ENV["scalar"]) if key in os.environ},
    }


# --------------------------------------------------------------------------------------------- processes


def _rss_child(args) -> None:
    """Peak RSS growth (KiB) of one step of one variant, after a first step allocated grads and optimizer state."""
    import resource

    import torch

    torch.set_num_threads(args.threads)
    workload, variant = args.rss_child.split(":", 1)
    if workload == "model":
        model = build_models(args.preset, args.vocab, args.seq, with_llama=variant == "llama")[variant]
        ids = torch.randint(0, args.vocab, (args.batch_size, args.seq), generator=torch.Generator().manual_seed(0))
        step = ModelStep(model, ids)
    else:
        step = build_layer_steps(args.isa_child, all_paths=True)[variant]
    step()
    with open("/proc/self/status") as f:
        current = next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
    step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"growth_kib": peak - current}))


def _child_command(args, extra: list[str]) -> list[str]:
    return [sys.executable, __file__, "--preset", args.preset, "--vocab", str(args.vocab), "--batch-size",
            str(args.batch_size), "--seq", str(args.seq), "--threads", str(args.threads), *extra]


def _run_json(command: list[str], env: dict) -> dict:
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def peak_rss_mib(args, workload: str, variant: str) -> float:
    data = _run_json(_child_command(args, ["--isa-child", args.isa_child, "--rss-child", f"{workload}:{variant}"]),
                     os.environ.copy())
    return data["growth_kib"] / 1024


def _summarise(times: tuple[dict, dict], saved: dict, rss: dict) -> dict:
    wall, cpu = times
    medians = {k: statistics.median(v) for k, v in wall.items()}
    mins = {k: min(v) for k, v in wall.items()}
    cpu_medians = {k: statistics.median(v) for k, v in cpu.items()}
    return {
        "step_s": medians,
        "step_min_s": mins,
        "step_cpu_s": cpu_medians,
        "ratio_vs_nn_linear": {k: medians[k] / medians["nn.Linear"] for k in medians},
        "ratio_of_min_vs_nn_linear": {k: mins[k] / mins["nn.Linear"] for k in mins},
        "cpu_ratio_vs_nn_linear": {k: cpu_medians[k] / cpu_medians["nn.Linear"] for k in cpu_medians},
        "saved_activation_bytes": saved,
        "saved_ratio": saved["bitlinear"] / saved["nn.Linear"],
        "peak_rss_growth_mib": rss,
        "peak_rss_ratio": rss["bitlinear"] / rss["nn.Linear"] if rss.get("nn.Linear") else None,
    }


def isa_child(args) -> None:
    """All measurements of one ISA (this process was started with that ISA's environment)."""
    import torch

    torch.set_num_threads(args.threads)
    ran = what_ran()
    result: dict = {"isa": args.isa_child, "ran": ran, "threads": args.threads, "torch": torch.__version__,
                    "loadavg_start": loadavg()}
    full = not args.quick

    models = build_models(args.preset, args.vocab, args.seq, with_llama=full)
    ids = torch.randint(0, args.vocab, (args.batch_size, args.seq), generator=torch.Generator().manual_seed(0))
    steps = {k: ModelStep(m, ids) for k, m in models.items()}
    times = time_steps(steps, args.warmup, args.repeats)
    saved = {k: saved_activation_bytes(s, s.model.parameters()) for k, s in steps.items()}
    rss = {k: peak_rss_mib(args, "model", k) for k in steps}
    result["model"] = {"preset": args.preset, "vocab": args.vocab, "batch": [args.batch_size, args.seq],
                       "parameters": sum(p.numel() for p in models["bitlinear"].parameters()),
                       **_summarise(times, saved, rss)}
    del steps, models

    if args.isa_child == "avx2" and full:
        # torch._int_mm's oneDNN path needs AVX-512 VNNI hardware: reach the loop an AVX2 CPU runs (see docstring).
        torch.backends.mkldnn.enabled = False
    lsteps = build_layer_steps(args.isa_child, all_paths=full)
    main_pair = {k: lsteps[k] for k in ("bitlinear", "nn.Linear")}
    ltimes = time_steps(main_pair, max(1, args.warmup - 1), args.layer_repeats)
    # The forced paths once each, after the pair warmed the layer up (int_mm's plain loop takes ~20 s a step).
    for name in [k for k in lsteps if k not in main_pair]:
        wall, cpu = time_steps({name: lsteps[name]}, 0, 1)
        ltimes[0].update(wall)
        ltimes[1].update(cpu)
    lsaved = {k: saved_activation_bytes(s, s.layer.parameters()) for k, s in main_pair.items()}
    lrss = {k: peak_rss_mib(args, "layer", k) for k in ("bitlinear", "nn.Linear")}
    result["layer"] = {"shape": list(LAYER_SHAPE), "tokens": list(LAYER_TOKENS), **_summarise(ltimes, lsaved, lrss)}
    result["loadavg_end"] = loadavg()
    print(json.dumps(result))


def _print_report(results: list[dict]) -> None:
    for r in results:
        ran = r["ran"]
        print(f"\n== {r['isa']}: bitnet kernels {ran['bitnet_kernels']}, ATen {ran['aten_capability']}, oneDNN "
              f"{ran['onednn_isa']}, MKL {ran['mkl_instructions']}; BitLinear product: {ran['bitlinear_path_model']} "
              f"(model), {ran['bitlinear_path_layer']} (layer); {r['threads']} threads; loadavg {r['loadavg_start']} "
              f"-> {r['loadavg_end']}")
        for workload in ("model", "layer"):
            w = r[workload]
            what = (f"model {w['preset']} ({w['parameters'] / 1e6:.2f}M params), batch {w['batch'][0]} x {w['batch'][1]}"
                    if workload == "model" else
                    f"layer {w['shape'][0]}x{w['shape'][1]}, {w['tokens'][0]} x {w['tokens'][1]} tokens, fwd+bwd")
            print(f"  {what}")
            for name, t in w["step_s"].items():
                saved = w["saved_activation_bytes"].get(name)
                rss = w["peak_rss_growth_mib"].get(name)
                print(f"    {name:>22}: step {t * 1e3:9.1f} ms (min {w['step_min_s'][name] * 1e3:9.1f}, CPU "
                      f"{w['step_cpu_s'][name] * 1e3:9.1f}) {w['ratio_vs_nn_linear'][name]:5.2f}x nn.Linear "
                      f"(CPU {w['cpu_ratio_vs_nn_linear'][name]:5.2f}x)"
                      + (f", saved {saved / 2**20:8.2f} MiB" if saved is not None else "")
                      + (f", peak RSS growth {rss:8.1f} MiB" if rss is not None else ""))
            print(f"    ratio BitLinear / nn.Linear: step {w['ratio_vs_nn_linear']['bitlinear']:.2f}x of medians, "
                  f"{w['ratio_of_min_vs_nn_linear']['bitlinear']:.2f}x of minima, "
                  f"{w['cpu_ratio_vs_nn_linear']['bitlinear']:.2f}x of CPU times (target <= 1.2x), "
                  f"saved activations {w['saved_ratio']:.2f}x (target < 1), peak RSS growth "
                  f"{w['peak_rss_ratio']:.2f}x")


def flat_rows(results: list[dict]) -> list[dict]:
    """One flat row per (ISA, workload, variant), the shape ``report.py`` tabulates and plots."""
    rows = []
    for r in results:
        for workload in ("model", "layer"):
            w = r[workload]
            base_saved = w["saved_activation_bytes"]["nn.Linear"]
            for name in w["step_s"]:
                rss = w["peak_rss_growth_mib"].get(name)
                saved = w["saved_activation_bytes"].get(name)
                rows.append({
                    "isa": r["isa"], "workload": workload, "variant": name,
                    "bitlinear_path": r["ran"][f"bitlinear_path_{workload}"] if name == "bitlinear" else
                    (name[len("bitlinear["):-1] if name.startswith("bitlinear[") else "-"),
                    "step_ms": w["step_s"][name] * 1e3, "step_min_ms": w["step_min_s"][name] * 1e3,
                    "step_ratio_vs_nn_linear": w["ratio_vs_nn_linear"][name],
                    "step_min_ratio_vs_nn_linear": w["ratio_of_min_vs_nn_linear"][name],
                    "step_cpu_ms": w["step_cpu_s"][name] * 1e3,
                    "step_cpu_ratio_vs_nn_linear": w["cpu_ratio_vs_nn_linear"][name],
                    "saved_mib": saved / 2**20 if saved is not None else None,
                    "saved_ratio_vs_nn_linear": saved / base_saved if saved is not None else None,
                    "peak_rss_growth_mib": rss,
                    "aten": r["ran"]["aten_capability"], "onednn": r["ran"]["onednn_isa"],
                    "loadavg": f"{r['loadavg_start']} -> {r['loadavg_end']}",
                })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--isa", nargs="+", default=None,
                        help="instruction sets to measure (default: every one this CPU supports except scalar)")
    parser.add_argument("--preset", default="5m")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=None, help="timed model steps (default 7, --quick 3)")
    parser.add_argument("--layer-repeats", type=int, default=None, help="timed layer steps (default 5, --quick 3)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="fewer repeats; no Llama and no forced-path variants")
    parser.add_argument("--json", default=None, help="also write the results to this file ('-': stdout only JSON)")
    parser.add_argument("--isa-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.repeats = args.repeats or (3 if args.quick else 7)
    args.layer_repeats = args.layer_repeats or (3 if args.quick else 5)
    if args.rss_child:
        _rss_child(args)
        return
    if args.isa_child:
        isa_child(args)
        return

    if args.isa is None:
        import torch

        import bitnet_torch

        torch.set_num_threads(1)
        args.isa = [isa for isa in bitnet_torch.available_cpu_isas() if isa != "scalar"] or ["scalar"]
    unknown = [isa for isa in args.isa if isa not in ISA_ENV]
    if unknown:
        parser.error(f"unknown ISA {unknown}; choose from {list(ISA_ENV)}")
    results = []
    for isa in args.isa:
        env = {**os.environ, **ISA_ENV[isa]}
        extra = ["--isa-child", isa, "--warmup", str(args.warmup), "--repeats", str(args.repeats),
                 "--layer-repeats", str(args.layer_repeats)] + (["--quick"] if args.quick else [])
        if args.json != "-":
            print(f"[{isa}] measuring (loadavg {loadavg()}) ...", flush=True)
        results.append(_run_json(_child_command(args, extra), env))
    document = {"benchmark": "bench_training", "description": __doc__.split("\n\n")[0], "threads": args.threads,
                "config": {"preset": args.preset, "vocab": args.vocab, "batch": [args.batch_size, args.seq],
                           "layer": list(LAYER_SHAPE), "layer_tokens": list(LAYER_TOKENS), "quick": args.quick,
                           "repeats": args.repeats, "layer_repeats": args.layer_repeats, "isa": args.isa},
                "results": flat_rows(results), "per_isa": results}
    if args.json == "-":
        print(json.dumps(document, indent=1))
        return
    _print_report(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(document, f, indent=1)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
