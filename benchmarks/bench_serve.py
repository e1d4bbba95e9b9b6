"""Serving throughput and latency: ``bitnet-torch serve`` against bitnet.cpp's ``llama-server``, same run.

For each shape (``100m``, ``2b4t``; random packed weights, see ``bench_generate.py``) this writes one checkpoint
with a synthetic byte-level BPE tokenizer covering the whole vocabulary (every token decodes to 1-3 printable
ASCII characters, so every generated token is one streamed chunk), exports it with our exporter
(``export_gguf(..., type="i2_s")``, what ``bitnet-torch export gguf DIR F.gguf --type i2_s`` runs), and serves it
in turn with

* ``ours`` -- ``python -m bitnet_torch.serving DIR --threads T --max-batch-size 16`` (int8 head and embedding);
* ``llama-server`` -- ``../shared/tools/native/run bitnet.cpp llama-server -m F.gguf -t T -c 16*CTX -np 16 -cb``
  (skipped with a note when the binary is absent).

Each server gets the same requests: ``/v1/completions`` with a prompt of ``--prompt-len`` random token ids
(different per request, same across servers), ``max_tokens`` = ``--max-tokens``, ``temperature 0``,
``ignore_eos`` (both servers honour it, so every request generates exactly ``max_tokens``), ``stream: true``.
At each concurrency (1, 4, 16 by default) that many client threads send ``--requests-per-client`` requests back to
back. Reported per (shape, server, concurrency): aggregate output tokens/s (all tokens / wall time from the first
request to the last answer), TTFT p50/p95 (request sent -> first token chunk) and inter-token latency p50/p95
(gaps between token chunks of a request), plus the load average before and after. Servers run one at a time.

Usage::

    python benchmarks/bench_serve.py --quick --shapes 100m            # a few minutes
    python benchmarks/bench_serve.py --threads 2 --json serve.json    # both shapes, 128-token prompts/outputs
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: where ``run`` (the native tools' wrapper) may be: $BITNET_NATIVE_RUN, ../shared/tools/native beside the checkout
#: (or beside its parent, for a git worktree), /work/shared/tools/native
NATIVE_RUN_CANDIDATES = [Path(p) for p in (os.environ.get("BITNET_NATIVE_RUN"),) if p] + [
    REPO.parent / "shared" / "tools" / "native" / "run",
    REPO.parent.parent / "shared" / "tools" / "native" / "run",
    Path("/work/shared/tools/native/run"),
]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "n/a"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def synthetic_tokenizer(vocab_size: int, bos_id: int, eos_id: int, out_dir: Path) -> None:
    """Save a byte-level BPE tokenizer with exactly ``vocab_size`` ids: the 256 byte symbols, then 2- and 3-character
    tokens of printable ASCII (each with its merge), and BOS/EOS as special tokens at ``bos_id`` / ``eos_id``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    ascii_chars = [chr(c) for c in range(0x21, 0x7F)]
    byte_symbols = sorted(set(alphabet), key=lambda ch: (ch not in ascii_chars, ch))
    normal: list[str] = list(byte_symbols)
    merges: list[tuple[str, str]] = []
    n_normal = vocab_size - 2
    for a in ascii_chars:
        for b in ascii_chars:
            if len(normal) >= n_normal:
                break
            normal.append(a + b)
            merges.append((a, b))
    pairs = [a + b for a in ascii_chars for b in ascii_chars]
    for ab in pairs:
        for c in ascii_chars:
            if len(normal) >= n_normal:
                break
            normal.append(ab + c)
            merges.append((ab, c))
        if len(normal) >= n_normal:
            break
    if len(normal) < n_normal:
        raise ValueError(f"vocab_size {vocab_size} is too large for the synthetic tokenizer")
    tokens = iter(normal)
    specials = {bos_id: "<|begin_of_text|>", eos_id: "<|end_of_text|>"}
    vocab = {specials[i] if i in specials else next(tokens): i for i in range(vocab_size)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=specials[bos_id], eos_token=specials[eos_id])
    fast.save_pretrained(out_dir)


def prepare_shape(shape: str, root: Path) -> tuple[Path, Path]:
    """Random packed checkpoint + tokenizer in ``root/shape`` and its I2_S GGUF; returns (dir, gguf).

    Files already in ``root`` (an earlier run with the same ``--workdir``) are reused."""
    import torch

    from bench_generate import shape_config
    from bitnet_torch.export import export_gguf
    from bitnet_torch.models import BitNetForCausalLM

    directory = root / shape
    config = shape_config(shape)
    gguf = root / f"{shape}-i2_s.gguf"
    if gguf.is_file() and (directory / "tokenizer.json").is_file():
        print(f"[{shape}] reusing {directory} and {gguf}", flush=True)
        return directory, gguf
    torch.manual_seed(0)
    model = BitNetForCausalLM.from_config(config, packed=True, dtype=torch.bfloat16)
    model.save_pretrained(directory)
    del model
    synthetic_tokenizer(config.vocab_size, config.bos_token_id, config.eos_token_id, directory)
    export_gguf(directory, gguf, type="i2_s")
    return directory, gguf


class Server:
    """A server subprocess (ours or llama-server) on a free loopback port; ready when ``/health`` says 200."""

    def __init__(self, name: str, argv: list[str], env: dict, log: Path):
        self.name = name
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._log_file = open(log, "wb")
        self.proc = subprocess.Popen([*argv, "--port", str(self.port)], env=env, stdout=self._log_file,
                                     stderr=subprocess.STDOUT, cwd=REPO)

    def wait_ready(self, timeout: float = 900.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: "
                                   f"{self.log.read_text(errors='replace')[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self._log_file.close()


def _one_request(client, url: str, model: str, prompt: list[int], max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    times: list[float] = []
    finish = None
    started = time.perf_counter()
    with client.stream("POST", url + "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.read()[:500]!r}")
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "choices" in chunk:  # OpenAI format (ours)
                choices = chunk.get("choices") or []
                if choices:
                    if choices[0].get("text"):
                        times.append(time.perf_counter())
                    finish = choices[0].get("finish_reason") or finish
            elif "content" in chunk:  # llama.cpp's native format (bitnet.cpp's llama-server answers /v1/completions so)
                if chunk["content"]:
                    times.append(time.perf_counter())
                if chunk.get("stop"):
                    finish = "length" if chunk.get("stopped_limit") else "stop"
                    if chunk.get("tokens_predicted") is not None and chunk["tokens_predicted"] != max_tokens:
                        raise RuntimeError(f"llama-server generated {chunk['tokens_predicted']} of {max_tokens} tokens")
                    break
    ended = time.perf_counter()
    if not times:
        raise RuntimeError("no token was streamed")
    return {"start": started, "end": ended, "chunks": len(times), "ttft": times[0] - started,
            "itl": [b - a for a, b in zip(times, times[1:])], "finish": finish}


def run_level(url: str, model: str, prompts: list[list[int]], max_tokens: int, concurrency: int,
              per_client: int) -> dict:
    """``concurrency`` client threads, ``per_client`` streamed requests each; aggregate and latency figures."""
    import httpx

    results: list[dict] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client_thread(index: int) -> None:
        with httpx.Client(timeout=httpx.Timeout(1800.0)) as client:
            for j in range(per_client):
                prompt = prompts[(index * per_client + j) % len(prompts)]
                try:
                    result = _one_request(client, url, model, prompt, max_tokens)
                except Exception as exc:  # noqa: BLE001 - reported in the results
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}")
                    return
                with lock:
                    results.append(result)

    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if not results:
        return {"concurrency": concurrency, "error": errors[0] if errors else "no result"}
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    tokens = max_tokens * len(results)
    ttft = sorted(r["ttft"] for r in results)
    itl = sorted(x for r in results for x in r["itl"])

    def pct(values: list[float], q: float) -> float:
        if len(values) == 1:
            return values[0]
        return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]

    return {
        "concurrency": concurrency, "requests": len(results), "errors": errors, "output_tokens": tokens,
        "wall_s": wall, "output_tok_s": tokens / wall,
        "ttft_p50_ms": pct(ttft, 50) * 1e3, "ttft_p95_ms": pct(ttft, 95) * 1e3,
        "itl_p50_ms": pct(itl, 50) * 1e3 if itl else float("nan"),
        "itl_p95_ms": pct(itl, 95) * 1e3 if itl else float("nan"),
        "chunks_per_request": statistics.mean(r["chunks"] for r in results),
        "finish_reasons": sorted({str(r["finish"]) for r in results}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["100m", "2b4t"], choices=["100m", "2b4t"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of each server (the same for both)")
    parser.add_argument("--quick", action="store_true", help="32-token prompts and outputs, one request per client")
    parser.add_argument("--servers", nargs="+", default=["ours", "llama-server"], choices=["ours", "llama-server"])
    parser.add_argument("--omp-passive", action=argparse.BooleanOptionalAction, default=None,
                        help="OMP_WAIT_POLICY=passive for both servers (default: when the load average exceeds the "
                             "CPU count: spinning OpenMP threads distort a shared machine)")
    parser.add_argument("--native-run", default=None, help="path of the native tools' `run` wrapper")
    parser.add_argument("--workdir", default=None, help="keep checkpoints and GGUFs here (default: a temp dir)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    if args.quick:
        args.prompt_len, args.max_tokens, args.requests_per_client = 32, 32, 1
    import bitnet_torch

    load1 = float(_loadavg().split()[0]) if _loadavg() != "n/a" else 0.0
    passive = args.omp_passive if args.omp_passive is not None else load1 > (os.cpu_count() or 1)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if passive:
        env["OMP_WAIT_POLICY"] = "passive"
    native_run = next((p for p in ([Path(args.native_run)] if args.native_run else NATIVE_RUN_CANDIDATES)
                       if (p.parent / "bitnet.cpp" / "bin" / "llama-server").is_file()), None)
    have_llama = native_run is not None
    report = {"isa": bitnet_torch.backend_info(), "threads": args.threads, "prompt_len": args.prompt_len,
              "max_tokens": args.max_tokens, "requests_per_client": args.requests_per_client,
              "omp_wait_policy": "passive" if passive else None, "loadavg_start": _loadavg(), "runs": [],
              "notes": []}
    if "llama-server" in args.servers and not have_llama:
        looked = ", ".join(str(p.parent / "bitnet.cpp/bin/llama-server") for p in NATIVE_RUN_CANDIDATES)
        report["notes"].append(f"llama-server skipped: not found (looked at {looked}; see --native-run)")
        print(report["notes"][-1], flush=True)
    ctx = args.prompt_len + args.max_tokens + 16
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        for shape in args.shapes:
            print(f"[{shape}] writing the checkpoint and the GGUF ...", flush=True)
            directory, gguf = prepare_shape(shape, root)
            from bench_generate import shape_config

            vocab = shape_config(shape).vocab_size
            n_prompts = max(args.concurrency) * args.requests_per_client
            prompts = [[rng.randrange(1000, vocab) for _ in range(args.prompt_len)] for _ in range(n_prompts)]
            for name in args.servers:
                if name == "llama-server" and not have_llama:
                    continue
                if name == "ours":
                    argv = [sys.executable, "-m", "bitnet_torch.serving", str(directory), "--threads",
                            str(args.threads), "--max-batch-size", "16", "--max-queue", "256", "--max-seq-len",
                            str(ctx), "--max-tokens-limit", str(args.max_tokens), "--no-request-log",
                            "--served-model-name", shape, "--request-timeout", "0"]
                else:
                    argv = [str(native_run), "bitnet.cpp", "llama-server", "-m", str(gguf), "-t", str(args.threads),
                            "-c", str(16 * ctx), "-np", "16", "-cb", "--host", "127.0.0.1"]
                server = Server(name, argv, env, root / f"{shape}-{name}.log")
                try:
                    server.wait_ready()
                    run_level(server.url, shape, prompts[:1], 4, 1, 1)  # warm-up
                    for concurrency in args.concurrency:
                        before = _loadavg()
                        result = run_level(server.url, shape, prompts, args.max_tokens, concurrency,
                                           args.requests_per_client)
                        result.update(shape=shape, server=name, loadavg_before=before, loadavg_after=_loadavg())
                        report["runs"].append(result)
                        _print_row(result)
                except Exception as exc:  # noqa: BLE001 - one failed server must not lose the other's figures
                    report["runs"].append({"shape": shape, "server": name, "error": f"{type(exc).__name__}: {exc}"})
                    print(f"[{shape}] {name} FAILED: {exc}", flush=True)
                finally:
                    server.stop()
    report["loadavg_end"] = _loadavg()
    _print_ratios(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2), encoding="utf-8")


def _print_row(r: dict) -> None:
    if "error" in r:
        print(f"[{r['shape']:>5}] {r['server']:<12} c={r.get('concurrency')}: FAILED {r['error']}", flush=True)
        return
    print(f"[{r['shape']:>5}] {r['server']:<12} c={r['concurrency']:<2} {r['output_tok_s']:8.1f} tok/s  "
          f"TTFT p50 {r['ttft_p50_ms']:8.1f} ms p95 {r['ttft_p95_ms']:8.1f} ms  "
          f"ITL p50 {r['itl_p50_ms']:7.1f} ms p95 {r['itl_p95_ms']:7.1f} ms  "
          f"({r['requests']} req, finish {','.join(r['finish_reasons'])}, load {r['loadavg_before'].split()[0]}"
          f"->{r['loadavg_after'].split()[0]})", flush=True)


def _print_ratios(report: dict) -> None:
    rows = {(r["shape"], r["server"], r.get("concurrency")): r for r in report["runs"] if "error" not in r}
    for (shape, server, c), ours in sorted(rows.items()):
        theirs = rows.get((shape, "llama-server", c))
        if server != "ours" or theirs is None:
            continue
        print(f"[{shape:>5}] c={c:<2} ours / llama-server: throughput {ours['output_tok_s'] / theirs['output_tok_s']:.2f}x, "
              f"ITL p95 {ours['itl_p95_ms']:.1f} vs {theirs['itl_p95_ms']:.1f} ms, "
              f"TTFT p50 {ours['ttft_p50_ms']:.0f} vs {theirs['ttft_p50_ms']:.0f} ms", flush=True)


if __name__ == "__main__":
    main()
