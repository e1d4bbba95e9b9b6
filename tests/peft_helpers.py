"""Shared by the LoRA tests (this file holds no tests): an adapter reloaded as a new user would."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]


def logits_of_adapter_in_a_fresh_process(adapter_dir: Path, ids: torch.Tensor, tmp_path: Path) -> torch.Tensor:
    """``AutoPeftModelForCausalLM.from_pretrained(adapter_dir)(ids).logits`` computed in a new offline process that
    only imported ``bitnet_torch``, run from another directory (so the base is found through the recorded path)."""
    save_file({"ids": ids}, tmp_path / "ids.safetensors")
    script = textwrap.dedent(f"""
        import torch
        import bitnet_torch
        from peft import AutoPeftModelForCausalLM
        from safetensors.torch import load_file, save_file
        model = AutoPeftModelForCausalLM.from_pretrained({str(adapter_dir)!r}).eval()
        ids = load_file({str(tmp_path / "ids.safetensors")!r})["ids"]
        with torch.no_grad():
            save_file({{"logits": model(input_ids=ids).logits.contiguous()}}, "logits.safetensors")
    """)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    python_path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": python_path}
    result = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return load_file(elsewhere / "logits.safetensors")["logits"]
