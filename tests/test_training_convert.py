"""examples/convert_pretrained.py: Llama → BitNet conversion, λ warm-up training, BitNet checkpoints."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "convert_pretrained.py"


@pytest.mark.slow
def test_convert_pretrained_example_warms_up_and_saves_bitnet(tmp_path):
    spec = importlib.util.spec_from_file_location("convert_pretrained", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"And God said, Let there be light: and there was light. Verse {i}." for i in range(60)))
    args = example.parse_args([
        "--tiny-random", "--data", str(corpus), "--max-steps", "8", "--lambda-warmup", "4", "--batch-size", "4",
        "--block-size", "32", "--eval-blocks", "4", "--lr", "3e-3", "--output-dir", str(tmp_path / "out"), "--no-tqdm",
    ])
    args.extra_training_args = {"use_cpu": True}
    results = example.run(args)
    assert all(math.isfinite(results[k]) for k in ("full_precision", "naive_conversion", "after_warmup"))
    assert results["after_warmup"] < results["naive_conversion"], results
    for form, mode in (("master", "online"), ("packed", "offline")):
        config = json.loads((tmp_path / "out" / form / "config.json").read_text())
        assert config["model_type"] == "bitnet" and config["quantization_config"]["quantization_mode"] == mode
    assert isinstance(results["sample"], str)
