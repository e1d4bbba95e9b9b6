"""The ``bitnet-torch`` command line on tiny local models: help, info, export, convert, generate, train, errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from bitnet_torch.cli import CLIError, main
from test_gguf_helpers import make_tiny_checkpoint, save_tiny_tokenizer

COMMANDS = [["train"], ["finetune"], ["generate"], ["convert"], ["export"], ["export", "gguf"], ["bench"], ["info"]]
REPO = Path(__file__).resolve().parents[1]


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A full-precision tiny Llama (with tokenizer) and a packed tiny BitNet checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("cli")
    llama = root / "llama"
    tokenizer = save_tiny_tokenizer(llama)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(llama)
    return {"root": root, "llama": llama, "packed": make_tiny_checkpoint(root / "packed", form="packed")}


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert out.startswith("usage: bitnet-torch " + " ".join(command))
    assert "--debug" in out or command == ["export"]


def test_info_reports_backend_and_versions(capsys):
    code, out, _ = run(["info", "--json"], capsys)
    info = json.loads(out)
    assert code == 0
    assert info["backend"]["backend"] in ("extension", "fallback")
    assert info["versions"]["torch"] and info["versions"]["gguf"]
    assert "loaded_library" in info["extension"]
    code, out, _ = run(["info"], capsys)
    assert code == 0 and "backend:" in out and "versions:" in out


def test_export_gguf_writes_a_verified_file(tiny, tmp_path, capsys):
    out_file = tmp_path / "tiny-tq2_0.gguf"
    code, out, err = run(["export", "gguf", tiny["packed"], out_file, "--type", "tq2_0"], capsys)
    assert code == 0, err
    assert out_file.is_file()
    assert "verified: 14 ternary tensors read back bit-exactly" in out
    import torch

    from bitnet_torch.export import load_gguf

    _, state = load_gguf(out_file)
    assert state["model.layers.0.mlp.down_proj.weight"].dtype == torch.uint8


def test_convert_full_precision_to_master_to_packed_and_refuse_packed_to_master(tiny, capsys):
    master, packed = tiny["root"] / "master", tiny["root"] / "packed-from-master"
    code, out, err = run(["convert", tiny["llama"], master], capsys)
    assert code == 0, err
    assert json.loads((master / "config.json").read_text())["quantization_config"]["quantization_mode"] == "online"
    assert (master / "tokenizer.json").is_file()
    code, out, err = run(["convert", master, packed], capsys)
    assert code == 0, err
    assert json.loads((packed / "config.json").read_text())["quantization_config"]["quantization_mode"] == "offline"
    code, out, err = run(["convert", packed, tiny["root"] / "back", "--to", "master"], capsys)
    assert code == 1
    assert err.startswith("error: ") and err.count("\n") == 1 and "master weights are gone" in err


def test_generate_streams_prompt_and_chat_with_tokens_per_second(tiny, capsys):
    code, out, err = run(["generate", tiny["packed"], "--prompt", "And God said", "--max-new-tokens", "4"], capsys)
    assert code == 0, err
    assert out.startswith("And God said")
    assert "tokens/s" in err and "[4 tokens" in err
    assert "packed projections, int8 lm_head" in err
    code, out, err = run(["generate", tiny["packed"], "--prompt", "And", "--max-new-tokens", "2", "--no-int8-lm-head"],
                         capsys)
    assert code == 0 and "float lm_head" in err
    code, out, err = run(["generate", tiny["packed"], "--chat", "--prompt", "hello", "--max-new-tokens", "3"], capsys)
    assert code == 0, err
    assert out.startswith("assistant> ") and "tokens/s" in err


def test_generate_compiled_decode_prints_the_same_text(tiny, capsys):
    args = ["--prompt", "And the earth", "--max-new-tokens", "5", "--temperature", "0"]
    code, eager, err = run(["generate", tiny["packed"], *args], capsys)
    assert code == 0, err
    # A real compile, whatever ran before in this process or on this machine: without it a cached graph
    # "compiles" in well under a second and the timing comparison below would measure nothing.
    import torch._dynamo
    import torch._inductor.config

    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False):  # Inductor's own patcher restores the option
        code, compiled, err = run(["generate", tiny["packed"], *args, "--compile"], capsys)
    assert code == 0, err
    assert compiled == eager and "tokens/s" in err
    # The compile minute is announced and kept out of the timed generation (issue 15 item 17).
    assert "[compiling the decode step (first call ~1 min)...]" in err
    compile_s = float(re.search(r"\[compiled in ([0-9.]+)s", err).group(1))
    total_s = float(re.search(r"\[5 tokens in ([0-9.]+)s", err).group(1))
    assert total_s < compile_s, f"the timed generation ({total_s} s) still includes compiling ({compile_s} s)"


def test_generate_samples_by_default_and_greedy_with_temperature_0(tiny, capsys):
    """The default samples (temperature 0.8, top-p 0.9): a seed reproduces it; --temperature 0 is greedy."""
    args = ["generate", tiny["packed"], "--prompt", "And", "--max-new-tokens", "8"]
    outs = {seed: run([*args, "--seed", seed], capsys)[1] for seed in ("1", "2", "3")}
    assert run([*args, "--seed", "1"], capsys)[1] == outs["1"], "a seed must reproduce the sample"
    assert len(set(outs.values())) > 1, "three seeds gave one text: the default does not sample"
    greedy = {run([*args, "--temperature", "0", "--seed", seed], capsys)[1] for seed in ("1", "2")}
    assert len(greedy) == 1
    code, _, err = run([*args, "--temperature", "-1"], capsys)
    assert code == 1 and "--temperature must be >= 0" in err


def test_generate_from_the_exported_gguf_matches_the_checkpoint(tiny, tmp_path, capsys):
    gguf_file = tmp_path / "m.gguf"
    assert run(["export", "gguf", tiny["packed"], gguf_file, "--embedding-type", "f32"], capsys)[0] == 0
    args = ["--prompt", "And the earth", "--max-new-tokens", "6", "--temperature", "0"]
    code, from_dir, err = run(["generate", tiny["packed"], *args], capsys)
    assert code == 0, err
    code, from_gguf, err = run(["generate", gguf_file, "--tokenizer", tiny["packed"], *args], capsys)
    assert code == 0, err
    assert from_gguf == from_dir


def test_missing_file_is_one_error_line_without_traceback(tmp_path, capsys):
    for argv in (["export", "gguf", tmp_path / "nope", tmp_path / "x.gguf"],
                 ["generate", tmp_path / "nope", "--prompt", "x"],
                 ["convert", tmp_path / "nope", tmp_path / "out"]):
        code, out, err = run(argv, capsys)
        assert code == 1
        assert err.startswith("error: ") and "not found" in err and err.count("\n") == 1, err
        assert "Traceback" not in err


def test_python_dash_m_runs_the_cli_and_errors_without_traceback(tmp_path):
    """One fresh interpreter (each costs seconds): ``python -m bitnet_torch`` reaches the CLI and fails cleanly."""
    completed = subprocess.run(
        [sys.executable, "-m", "bitnet_torch", "export", "gguf", str(tmp_path / "nope"), str(tmp_path / "x.gguf")],
        capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 1
    assert "Traceback" not in completed.stderr
    assert completed.stderr.strip().splitlines()[-1].startswith("error: model directory not found")


def test_debug_shows_the_exception(tmp_path):
    with pytest.raises(CLIError, match="not found"):
        main(["--debug", "generate", str(tmp_path / "nope"), "--prompt", "x"])


def test_bench_without_benchmark_scripts_reports_clearly(tmp_path, capsys):
    bench_dir = tmp_path / "benchmarks"
    bench_dir.mkdir()
    (bench_dir / "report.py").write_text((REPO / "benchmarks" / "report.py").read_text())
    code, out, err = run(["bench", "--out", tmp_path / "report", "--bench-dir", bench_dir], capsys)
    assert code == 1 and "no benchmark ran" in err


def test_bench_report_renders_tables_plot_and_machine_info(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import report
    finally:
        sys.path.pop(0)
    result = tmp_path / "bench_linear.json"
    result.write_text(json.dumps({  # the shape bench_linear.py writes; the numbers only feed the renderer
        "meta": {"device": "cpu", "threads": 2},
        "linear": [
            {"K": 2560, "N": 2560, "M": 1, "ms": {"ours": 0.5, "fp32": 1.6}, "speedup_vs": {"fp32": 3.2}},
            {"K": 2560, "N": 2560, "M": 128, "ms": {"ours": 4.0, "fp32": 5.6}, "speedup_vs": {"fp32": 1.4}},
        ],
        "activation_quantization": {"ours_ms": 0.1, "ratio_two_passes_over_ours": 1.5},
    }))
    md = report.write_report([result], tmp_path / "out")
    text = md.read_text()
    assert "| K | N | M | ms.ours | ms.fp32 | speedup_vs.fp32 |" in text
    assert "| 2560 | 2560 | 128 | 4 | 5.6 | 1.4 |" in text
    assert "### activation_quantization" in text and '- **meta**: `{"device": "cpu", "threads": 2}`' in text
    assert "## Machine" in text and "logical_cores" in text
    assert (tmp_path / "out" / "report.png").stat().st_size > 1000


def test_train_tiny_budget_writes_master_and_packed(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"Verse {i}. In the beginning God created the heaven and the earth.\n\n" for i in range(40)))
    code, out, err = run(["train", "--output-dir", tmp_path / "run", "--data", corpus, "--preset", "5m",
                          "--vocab-size", "300", "--max-steps", "2", "--block-size", "32", "--batch-size", "2",
                          "--eval-steps", "0", "--eval-tokens", "62", "--sample-tokens", "4", "--disable-tqdm"], capsys)
    assert code == 0, err
    assert "trained" in out and "validation perplexity" in out
    assert out.count("'loss'") == 2, "a 2-step run must still print its loss lines"
    assert "the unigram baseline" in out
    assert (tmp_path / "run" / "packed" / "config.json").is_file()
    assert (tmp_path / "run" / "master" / "config.json").is_file()


def test_finetune_tiny_budget_trains_and_merges_a_lora_adapter(tiny, tmp_path, capsys):
    master = tmp_path / "master"
    assert run(["convert", tiny["llama"], master], capsys)[0] == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, out, err = run(["finetune", master, "--output-dir", tmp_path / "ft", "--max-steps", "2", "--batch-size", "2",
                              "--num-examples", "8", "--max-length", "64", "--logging-steps", "1", "--sample-tokens", "4",
                              "--disable-tqdm"], capsys)
    assert code == 0, err
    pinned = [str(w.message) for w in caught if "pin_memory" in str(w.message)]
    assert not pinned or torch.cuda.is_available(), f"pin_memory warning on a CPU-only run: {pinned[0]}"
    assert "fine-tuned" in out and "loss" in out
    assert (tmp_path / "ft" / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "ft" / "merged-packed" / "config.json").is_file()


def test_out_of_memory_and_wrong_format_errors_read_as_one_line_with_a_hint(tmp_path, capsys):
    from bitnet_torch.cli import _error_line

    line = _error_line(MemoryError("cannot allocate 12 GiB"))
    assert line.startswith("out of memory") and "hint:" in line and "\n" not in line
    not_gguf = tmp_path / "weights.txt"
    not_gguf.write_text("hello")
    code, _, err = run(["generate", not_gguf, "--prompt", "x"], capsys)
    assert code == 1 and "not a .gguf" in err and err.count("\n") == 1


def _imported_modules(stderr: str) -> set[str]:
    """Top-level names of the modules ``python -X importtime`` reports as imported."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


def _console_script(tmp_path: Path) -> Path:
    """The console script pip generates from pyproject's [project.scripts] entry (same code, same file name)."""
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, function = scripts["bitnet-torch"].split(":")
    script = tmp_path / "bitnet-torch"
    script.write_text(
        "# -*- coding: utf-8 -*-\nimport re\nimport sys\n"
        f"from {module} import {function}\n"
        "if __name__ == '__main__':\n"
        "    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])\n"
        f"    sys.exit({function}())\n"
    )
    return script


@pytest.mark.parametrize("entry", ["python -m", "console script"])
@pytest.mark.parametrize("argv", [["--help"], ["generate", "--help"], ["export", "gguf", "--help"],
                                  ["bench", "--help"], ["train", "--help"], ["finetune", "--help"], ["serve", "--help"],
                                  ["generate"], ["no-such-command"], ["train", "--no-such-option"], ["finetune"]],
                         ids=" ".join)
def test_help_and_argument_errors_do_not_import_torch(entry, argv, tmp_path):
    """``--help`` and argument errors answer before torch/Transformers load (issue 15 item 13)."""
    import time

    launcher = ["-m", "bitnet_torch"] if entry == "python -m" else [str(_console_script(tmp_path))]
    started = time.perf_counter()
    completed = subprocess.run([sys.executable, "-X", "importtime", *launcher, *argv],
                               capture_output=True, text=True, timeout=120, cwd=tmp_path,
                               env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    elapsed = time.perf_counter() - started
    assert completed.returncode == (0 if "--help" in argv else 2), completed.stderr[-2000:]
    heavy = _imported_modules(completed.stderr) & {"torch", "transformers", "numpy", "datasets", "gguf"}
    assert not heavy, f"{' '.join(argv)} imported {sorted(heavy)}"
    if "--help" in argv:
        assert completed.stdout.startswith("usage: bitnet-torch")
    else:
        assert "usage: bitnet-torch" in completed.stderr and "error:" in completed.stderr
    assert elapsed < 30, f"{elapsed:.1f} s"


def test_import_bitnet_torch_still_registers_the_auto_classes_eagerly():
    """A plain ``import bitnet_torch`` (not the command line) imports the API and registers the Auto classes."""
    code = ("import sys, bitnet_torch\n"
            "assert 'torch' in sys.modules and 'BitLinear' in vars(bitnet_torch)\n"
            "from transformers import AutoConfig, AutoModelForCausalLM\n"
            "from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING\n"
            "assert AutoConfig.for_model('bitnet').__class__ is bitnet_torch.BitNetConfig\n"
            "assert MODEL_FOR_CAUSAL_LM_MAPPING[bitnet_torch.BitNetConfig] is bitnet_torch.BitNetForCausalLM\n")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                               env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert completed.returncode == 0, completed.stderr[-2000:]


def test_export_parser_choices_match_the_exporter():
    """cli/export.py repeats the exporter's choices (to keep torch out of --help); they must agree."""
    from bitnet_torch.cli import export as cli_export
    from bitnet_torch.export import gguf

    assert cli_export.GGUF_TYPES == gguf.GGUF_TYPES
    assert cli_export.GGUF_ARCHITECTURES == gguf.GGUF_ARCHITECTURES
    assert cli_export.GGUF_EMBEDDING_TYPES == gguf.GGUF_EMBEDDING_TYPES


def test_bench_speedups_read_as_faster_or_slower():
    """0.06 is "17x slower", not "0.06x faster" (issue 15 item 17)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import report
    finally:
        sys.path.pop(0)
    assert report.describe_speedup(3.2) == "3.20x faster"
    assert report.describe_speedup(0.06) == "17x slower"
    assert report.describe_speedup(0.5) == "2.00x slower"
    assert report.describe_speedup(1.0) == "as fast (1.00x)"
    assert "not a valid" in report.describe_speedup(0.0)
    rows = [{"variant": "llama_bf16", "shape": "100m", "ours_decode_speedup.ours": 0.0588}]
    assert report.speedup_sentences(rows) == ["llama_bf16 100m: `ours_decode_speedup.ours` 17x slower"]
