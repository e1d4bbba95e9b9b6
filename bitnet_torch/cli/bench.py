"""``bitnet-torch bench``: run the kernel and generation benchmarks, write a Markdown + PNG report."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from ._common import CLIError


def _benchmarks_dir(explicit: str | None) -> Path:
    """The benchmarks/ directory: --bench-dir, ./benchmarks, or the checkout this package lives in."""
    candidates = [Path(explicit)] if explicit else [Path.cwd() / "benchmarks", Path(__file__).resolve().parents[2] / "benchmarks"]
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


def run(args: argparse.Namespace) -> int:
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


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add the ``bench`` subcommand to ``sub``."""
    p = sub.add_parser("bench", parents=[common], help="run the benchmarks and write a report",
                       description="Run benchmarks/bench_linear.py and bench_generate.py (quick mode unless --full) "
                                   "and write report.md (tables, machine info) and report.png into --out.")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--full", action="store_true", help="full benchmark sizes instead of the quick mode")
    p.add_argument("--only", nargs="+", choices=("bench_linear", "bench_generate"), default=None,
                   help="run only these benchmarks")
    p.add_argument("--threads", type=int, default=None, help="threads for the benchmarks")
    p.add_argument("--bench-dir", default=None, help="benchmarks directory (default: ./benchmarks or the checkout's)")
    p.set_defaults(handler=run)
