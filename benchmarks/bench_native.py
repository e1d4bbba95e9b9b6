"""Our CPU decode engine and bitnet.cpp side by side, on the same random weights, in one run (issue 12).

For each shape (``2b4t``: BitNet b1.58 2B-4T; ``100m``: 12 layers, hidden 768) the script

1. builds random packed weights (seeded; :func:`bench_generate.shape_config`), saves them as a packed checkpoint
   and exports it twice with our own exporter, cached under ``--workdir``: ``export_gguf(..., type="i2_s",
   embedding_type="f16")`` (F16 ``token_embd``, bitnet.cpp's official 2B-4T configuration) and
   ``embedding_type="q6_k"`` (the same weights, ``token_embd`` — the tied head — in ggml's Q6_K, 2.4x fewer bytes
   read per token);
2. runs bitnet.cpp's ``llama-bench -m F -t T -p P -n N -r R -o json`` on each file (skipped, with a note, when the
   prebuilt binaries in ``/work/shared/tools/native`` are absent);
3. runs ours in a fresh process per thread count: the same seeded weights with the int8 head shared with the
   int8 embedding (what keeps the process under 1.3 GB), on :class:`bitnet_torch.models.engine.DecodeEngine`:
   ``tg`` (N tokens decoded one by one from an empty cache, as llama-bench's tgN), ``pp`` (a P-token prefill),
   batched decode of B sequences (``--batch``, default 8 and 16; aggregate tokens/s), the eager path of today (``model(...)`` per token with
   Transformers' cache: tokens/s over a few steps) and the resident memory (VmRSS while decoding one sequence,
   and the peak VmHWM);

and prints one table with both engines (bitnet.cpp with the F16 and with the Q6_K token embedding), the ratios,
the CPU's instruction set (detected at run time) and ``/proc/loadavg`` before and after. Figures are medians of
``--repeats`` runs. A TQ2_0 token embedding for bitnet.cpp is reported as missing (our exporter does not write one).

Usage::

    python benchmarks/bench_native.py                       # both shapes, 1 and 2 threads, 3 repeats
    python benchmarks/bench_native.py --quick               # 100m only, short runs: does everything work?
    python benchmarks/bench_native.py --json out.json --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NATIVE = Path(os.environ.get("BITNET_NATIVE_TOOLS", "/work/shared/tools/native"))
SHAPES = ("2b4t", "100m")
SEED = 0


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "unknown"


def build_model(shape: str, int8: bool):
    """The seeded random packed model of ``shape`` (bf16; int8 head shared with an int8 embedding if ``int8``)."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_generate import shape_config

    from bitnet_torch.models import BitNetForCausalLM

    torch.manual_seed(SEED)
    model = BitNetForCausalLM.from_config(shape_config(shape), packed=True, dtype=torch.bfloat16).eval()
    if int8:
        model.quantize_output_layers(lm_head=True, embedding=True)
    return model


# ------------------------------------------------------------------------------------------------ GGUF export


def _save_tokenizer(model_dir: Path, vocab_size: int) -> None:
    """A small byte-level BPE tokenizer (the GGUF needs one; the exporter pads the vocabulary to the model's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    trainer = trainers.BpeTrainer(vocab_size=min(300, vocab_size), special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["In the beginning God created the heaven and the earth."] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=specials[0], eos_token=specials[1],
                                   pad_token=specials[1])
    fast.save_pretrained(model_dir)


#: bitnet.cpp's token embedding variants: ``export_gguf``'s ``embedding_type`` -> the row label.
EMBEDDINGS = {"f16": "F16", "q6_k": "Q6_K"}


def export_worker(shape: str, out: Path, embedding_type: str) -> None:
    """Write the shape's seeded random weights as an I2_S GGUF with ``embedding_type`` token_embd (our exporter)."""
    import tempfile

    from bitnet_torch.export import export_gguf

    model = build_model(shape, int8=False)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        model.save_pretrained(tmp, packed=True)
        del model
        _save_tokenizer(Path(tmp), 300)
        export_gguf(tmp, out, "i2_s", embedding_type=embedding_type, verify=False)


def ensure_gguf(shape: str, workdir: Path, embedding_type: str) -> Path:
    """The cached I2_S GGUF of ``shape`` with an ``embedding_type`` token embedding (exported on first use)."""
    path = workdir / shape / f"model-i2_s-{embedding_type.replace('_', '')}emb.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"[{shape}] exporting random weights to {path} ...", flush=True)
        subprocess.run([sys.executable, __file__, "--export-worker", shape, str(path), embedding_type], check=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    return path


# ------------------------------------------------------------------------------------------------ bitnet.cpp


def native_available() -> bool:
    return (NATIVE / "run").exists() and (NATIVE / "bitnet.cpp" / "bin" / "llama-bench").exists()


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from the parent ids in /proc/*/stat)."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parent[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        children = [c for c, pp in parent.items() if pp == p]
        out += children
        todo += children
    return out


def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_bitnet_cpp(gguf: Path, threads: int, prompt: int, tokens: int, repeats: int, env: dict) -> dict:
    """llama-bench's pp/tg tokens/s (median of its samples) and the largest RSS its process reached (polled)."""
    cmd = [str(NATIVE / "run"), "bitnet.cpp", "llama-bench", "-m", str(gguf), "-t", str(threads), "-p", str(prompt),
           "-n", str(tokens), "-r", str(repeats), "-o", "json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = 0
    while proc.poll() is None:
        peak = max([peak] + [_rss_bytes(p) for p in [proc.pid, *_descendants(proc.pid)]])
        time.sleep(0.2)
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        return {"error": f"llama-bench exited {proc.returncode}: {stderr.strip()[-400:]}"}
    rows = json.loads(stdout[stdout.index("["):])
    result: dict = {"command": " ".join(cmd), "peak_rss_gb": peak / 1e9 if peak else None}
    for row in rows:
        samples = row.get("samples_ts") or [row.get("avg_ts")]
        key = "pp" if row.get("n_prompt", 0) > 0 and row.get("n_gen", 0) == 0 else "tg"
        result[key + "_tok_s"] = statistics.median(samples)
    return result


# ------------------------------------------------------------------------------------------------ ours


def ours_worker(shape: str, threads: int, prompt: int, tokens: int, batches: list[int], repeats: int) -> None:
    """Measure our engine in this process and print one JSON line."""
    import torch
    from bench_generate import proc_status_bytes  # this script's folder: workers run as the script

    torch.set_num_threads(threads)
    rss_start = proc_status_bytes("VmRSS")
    model = build_model(shape, int8=True)
    from bitnet_torch import _backend
    from bitnet_torch.models.engine import DecodeEngine

    rss_model = proc_status_bytes("VmRSS")
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(3, vocab, (prompt,), generator=g).tolist()
    engine = DecodeEngine(model, max_batch_size=max(batches), max_seq_len=max(prompt, tokens + 1) + 1)
    res: dict = {"shape": shape, "threads": threads, "cpu_isa": _backend.cpu_isa(), "path": engine.reason}

    def tg_once() -> float:
        slot = engine.allocate()
        token = int(engine.prefill(slot, [prompt_ids[0]]).argmax())
        start = time.perf_counter()
        for _ in range(tokens):
            token = int(engine.decode([slot], [token])[0].argmax())
        elapsed = time.perf_counter() - start
        engine.release(slot)
        return tokens / elapsed

    def pp_once() -> float:
        slot = engine.allocate()
        start = time.perf_counter()
        engine.prefill(slot, prompt_ids)
        elapsed = time.perf_counter() - start
        engine.release(slot)
        return prompt / elapsed

    def batched_once(batch: int) -> float:
        slots = [engine.allocate() for _ in range(batch)]
        toks = [int(engine.prefill(s, [prompt_ids[i]]).argmax()) for i, s in enumerate(slots)]
        start = time.perf_counter()
        for _ in range(tokens):
            toks = engine.decode(slots, toks).argmax(-1).tolist()
        elapsed = time.perf_counter() - start
        for s in slots:
            engine.release(s)
        return batch * tokens / elapsed

    tg_once()  # warm-up (first touch of the step buffers, the thread pool)
    res["tg_tok_s"] = statistics.median(tg_once() for _ in range(repeats))
    res["rss_decoding_gb"] = proc_status_bytes("VmRSS") / 1e9
    res["pp_tok_s"] = statistics.median(pp_once() for _ in range(repeats))
    res["batched"] = {str(b): statistics.median(batched_once(b) for _ in range(repeats)) for b in batches}
    res["batch"] = batches[0]
    res["batched_tok_s"] = res["batched"][str(batches[0])]
    # Today's eager path, for reference: one forward per token with Transformers' cache.
    with torch.inference_mode():
        out = model(torch.tensor([prompt_ids[:1]]), use_cache=True)
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        steps = 8 if tokens >= 32 else 4
        for _ in range(2):
            out = model(token, cache=cache, use_cache=True)
            cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(steps):
            out = model(token, cache=cache, use_cache=True)
            cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        res["eager_tg_tok_s"] = steps / (time.perf_counter() - start)
        # Prefill through the existing path (one forward over the prompt, as generate() does): is it faster?
        eager_pp = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(torch.tensor([prompt_ids]), use_cache=True, logits_to_keep=1)
            eager_pp.append(prompt / (time.perf_counter() - start))
        res["eager_pp_tok_s"] = statistics.median(eager_pp)
    res["rss_start_gb"] = rss_start / 1e9
    res["rss_model_gb"] = rss_model / 1e9
    res["peak_rss_gb"] = proc_status_bytes("VmHWM") / 1e9
    print(json.dumps(res), flush=True)


def run_ours(shape: str, threads: int, args: argparse.Namespace, env: dict) -> dict:
    cmd = [sys.executable, __file__, "--ours-worker", shape, str(threads), str(args.prompt), str(args.tokens),
           args.batch, str(args.repeats)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**env, "PYTHONPATH": str(REPO)}, check=False)
    if done.returncode != 0:
        return {"error": f"worker exited {done.returncode}: {done.stderr.strip()[-800:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ report


def _fmt(v, digits=1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _ratio(a, b) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def print_table(results: list[dict]) -> None:
    print()
    print("| shape | threads | metric | bitnet.cpp | ours (engine) | ratio | ours eager |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        nat, ours = r.get("bitnet_cpp", {}), r.get("ours", {})
        if "error" in ours:
            print(f"| {r['shape']} | {r['threads']} | ours failed: {ours['error'][:200]} |")
            continue
        head = f"| {r['shape']} | {r['threads']} "
        print(head + f"| tg{r['tokens']} tok/s | {_fmt(nat.get('tg_tok_s'))} | {_fmt(ours.get('tg_tok_s'))} | "
              f"{_ratio(ours.get('tg_tok_s'), nat.get('tg_tok_s'))} | {_fmt(ours.get('eager_tg_tok_s'))} |")
        print(head + f"| pp{r['prompt']} tok/s | {_fmt(nat.get('pp_tok_s'))} | {_fmt(ours.get('pp_tok_s'))} | "
              f"{_ratio(ours.get('pp_tok_s'), nat.get('pp_tok_s'))} | {_fmt(ours.get('eager_pp_tok_s'))} |")
        q6 = r.get("bitnet_cpp_q6_k", {})
        for metric, n in (("tg", r["tokens"]), ("pp", r["prompt"])) if q6 else ():
            theirs, mine = q6.get(f"{metric}_tok_s"), ours.get(f"{metric}_tok_s")
            print(head + f"| {metric}{n} tok/s vs bitnet.cpp Q6_K token_embd | {_fmt(theirs)} | {_fmt(mine)} | "
                  f"{_ratio(mine, theirs)} | |")
        for b, batched in (ours.get("batched") or {str(ours.get("batch")): ours.get("batched_tok_s")}).items():
            print(head + f"| batched B={b} aggregate tok/s | - | {_fmt(batched)} | "
                  f"{_ratio(batched, ours.get('tg_tok_s'))} of ours tg; {_ratio(batched, ours.get('pp_tok_s'))} of ours pp | |")
        q6_rss = f"; Q6_K emb {_fmt(q6.get('peak_rss_gb'), 2)}" if q6 else ""
        print(head + f"| RSS GB (decoding / peak) | {_fmt(nat.get('peak_rss_gb'), 2)} (peak{q6_rss}) | "
              f"{_fmt(ours.get('rss_decoding_gb'), 2)} / {_fmt(ours.get('peak_rss_gb'), 2)} | | |")
        for label, result in (("bitnet.cpp", nat), ("bitnet.cpp (Q6_K token_embd)", q6)):
            if "error" in result:
                print(head + f"| {label} failed: {result['error'][:200]} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated: 2b4t, 100m")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=128, help="pp length (llama-bench -p)")
    parser.add_argument("--tokens", type=int, default=128, help="tg length (llama-bench -n)")
    parser.add_argument("--batch", default="8,16",
                        help="comma-separated batch sizes of the batched decode (the issue's target is B=8; 16 is what "
                             "the server's continuous batching reaches)")
    parser.add_argument("--quick", action="store_true", help="100m only, -p/-n 32, one repeat")
    parser.add_argument("--no-native", action="store_true", help="skip bitnet.cpp")
    parser.add_argument("--omp-passive", choices=("auto", "yes", "no"), default="auto",
                        help="OMP_WAIT_POLICY=passive for both engines (auto: when the load exceeds the cores)")
    parser.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "bitnet_torch" / "bench_native")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = parser.parse_args(argv)
    if args.quick:
        args.shapes, args.repeats, args.prompt, args.tokens = "100m", 1, 32, 32
    shapes = [s for s in args.shapes.split(",") if s]
    threads = [int(t) for t in args.threads.split(",") if t]
    for s in shapes:
        if s not in SHAPES:
            parser.error(f"unknown shape {s!r}")
    try:
        batches = [int(b) for b in args.batch.split(",") if b]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        parser.error(f"--batch must list positive batch sizes, got {args.batch!r}")
    args.batch = ",".join(map(str, batches))
    env = dict(os.environ)
    load_before = loadavg()
    cores = os.cpu_count() or 1
    passive = args.omp_passive == "yes" or (args.omp_passive == "auto" and float(load_before.split()[0]) > cores)
    if passive:
        env["OMP_WAIT_POLICY"] = "passive"
    native = native_available() and not args.no_native
    print(f"loadavg before: {load_before}; cores: {cores}; OMP_WAIT_POLICY={env.get('OMP_WAIT_POLICY', '(unset)')}")
    if not native:
        print("bitnet.cpp: skipped (" + ("--no-native" if args.no_native else f"no binaries under {NATIVE}") + ")")
    results = []
    for shape in shapes:
        ggufs = {emb: ensure_gguf(shape, args.workdir, emb) for emb in EMBEDDINGS} if native else {}
        for t in threads:
            row = {"shape": shape, "threads": t, "prompt": args.prompt, "tokens": args.tokens}
            for emb, gguf in ggufs.items():
                print(f"[{shape}, {t} threads] bitnet.cpp llama-bench ({EMBEDDINGS[emb]} token_embd) ...", flush=True)
                key = "bitnet_cpp" if emb == "f16" else f"bitnet_cpp_{emb}"
                row[key] = run_bitnet_cpp(gguf, t, args.prompt, args.tokens, args.repeats, env)
            print(f"[{shape}, {t} threads] ours ...", flush=True)
            row["ours"] = run_ours(shape, t, args, env)
            results.append(row)
    load_after = loadavg()
    isa = next((r["ours"].get("cpu_isa") for r in results if "cpu_isa" in r["ours"]), None)
    print_table(results)
    print(f"\nCPU ISA (ours, runtime-detected): {isa}; bitnet.cpp kernels: AVX2 (I2_S, no AVX-512 path)")
    print("bitnet.cpp columns: the I2_S file with an F16 token_embd (the tied head; bitnet.cpp's official 2B-4T "
          "layout), and the same weights with a Q6_K token_embd (rows 'vs bitnet.cpp Q6_K token_embd'); "
          "a TQ2_0 token embedding: missing (our exporter does not write one)")
    print(f"loadavg before: {load_before}; after: {load_after}")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "loadavg_before": load_before, "loadavg_after": load_after,
                                         "cpu_isa": isa, "omp_wait_policy": env.get("OMP_WAIT_POLICY")}, indent=2))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--export-worker":
        export_worker(sys.argv[2], Path(sys.argv[3]), sys.argv[4])
    elif len(sys.argv) > 1 and sys.argv[1] == "--ours-worker":
        ours_worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]),
                    [int(b) for b in sys.argv[6].split(",")], int(sys.argv[7]))
    else:
        sys.exit(main())
