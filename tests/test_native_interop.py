"""Our GGUF files in the real runtimes: bitnet.cpp and upstream llama.cpp compute our model's logits (opt-in).

Set ``BITNET_TORCH_NATIVE_RUN`` to the runner of the prebuilt runtimes (``../shared/tools/native/run``; ``.ci/run``
does when that folder exists). For every type (i2_s, tq2_0, tq1_0, f16) x FFN activation (relu2, silu) x GGUF
architecture, a small random model is exported and evaluated by ``logits_dump`` in each runtime on fixed token ids:

* a combination the runtime table promises (``report.runtimes``) must load and match our fp32 logits: the same
  top-1 token at every position, mean KL < 1e-3, and the same greedy continuation;
* a runtime the table leaves out must fail to load the file (it is not silently run as something else);
* a combination whose runtime graph computes another activation must be refused by the exporter; forced with
  ``allow_activation_mismatch``, it loads and computes a measurably different model (mean KL > 1e-2), which is why
  it is refused.

``BITNET_TORCH_NATIVE_TABLE=path.md`` additionally writes the runtime x type x activation table
(loads, top-1 agreement, KL, greedy).
"""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from bitnet_torch import BitNetForCausalLM
from bitnet_torch.export import GGUFExportError, export_gguf
from bitnet_torch.formats.gguf_layout import ARCH_ACTIVATION, GGUF_ARCHITECTURES, GGUF_TYPES
from test_gguf_helpers import make_tiny_checkpoint

NATIVE_RUN = os.environ.get("BITNET_TORCH_NATIVE_RUN")
pytestmark = [
    pytest.mark.skipif(
        not NATIVE_RUN or not os.access(NATIVE_RUN, os.X_OK),
        reason="opt-in: set BITNET_TORCH_NATIVE_RUN to the native runtimes' runner (../shared/tools/native/run)",
    ),
    pytest.mark.slow,
]

RUNTIMES = ("bitnet.cpp", "llama.cpp")
IDS = [0, 5, 17, 42, 99, 3, 77, 120, 200, 250, 33, 64, 128, 7, 19, 88,
       150, 160, 170, 180, 190, 210, 220, 230, 240, 260, 270, 280, 290, 11, 13, 15]
N_GEN = 8
KL_MATCH = 1e-3  # measured on this model: 1e-7 .. 2e-4 where the function is the same
KL_DIFFERENT = 1e-2  # measured: 9e-2 .. 1.3e-1 where the runtime's FFN activation is not the model's
TABLE: list[dict] = []


def read_dump(path: Path) -> tuple[np.ndarray, list[int]]:
    """``logits_dump``'s file: int32 n_vocab, n_prompt, float32 logits[n_prompt][n_vocab], int32 n_gen, ids."""
    data = path.read_bytes()
    n_vocab, n_prompt = struct.unpack_from("<ii", data, 0)
    logits = np.frombuffer(data, dtype=np.float32, count=n_vocab * n_prompt, offset=8).reshape(n_prompt, n_vocab)
    (n_gen,) = struct.unpack_from("<i", data, 8 + 4 * n_vocab * n_prompt)
    gen = list(struct.unpack_from(f"<{n_gen}i", data, 12 + 4 * n_vocab * n_prompt))
    return logits, gen


def run_logits_dump(runtime: str, gguf_file: Path, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_WAIT_POLICY": "passive"}  # the shared machine is loaded; numerics are unaffected
    return subprocess.run(
        [NATIVE_RUN, runtime, "logits_dump", str(gguf_file), str(out), "2", ",".join(map(str, IDS)), str(N_GEN)],
        capture_output=True, text=True, timeout=300, env=env,
    )


def compare(ref: np.ndarray, ref_gen: list[int], got: np.ndarray, got_gen: list[int]) -> dict:
    def log_softmax(z):
        z = z.astype(np.float64)
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lr, lg = log_softmax(ref), log_softmax(got)
    kl = (np.exp(lr) * (lr - lg)).sum(-1)
    greedy = next((i for i, (a, b) in enumerate(zip(ref_gen, got_gen)) if a != b), len(ref_gen))
    return {"top1": int((ref.argmax(-1) == got.argmax(-1)).sum()), "positions": len(ref), "kl_mean": float(kl.mean()),
            "kl_max": float(kl.max()), "greedy": greedy}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """relu2 and silu checkpoints (same weights otherwise) and our own fp32 logits + greedy continuation."""
    root = tmp_path_factory.mktemp("native")
    out = {}
    for act in ("relu2", "silu"):
        # embedding std 0.2: logits spread enough for a clear top-1 while the FFN still shapes them
        model_dir = make_tiny_checkpoint(root / act, form="packed", hidden_act=act, embedding_std=0.2)
        model = BitNetForCausalLM.from_pretrained(model_dir, packed=True, dtype=torch.float32).eval()
        x = torch.tensor([IDS])
        with torch.no_grad():
            logits = model(x).logits[0].numpy()
            gen = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=N_GEN, do_sample=False,
                                 pad_token_id=0)[0, len(IDS):].tolist()
        out[act] = (model_dir, logits, gen)
    yield out
    table_path = os.environ.get("BITNET_TORCH_NATIVE_TABLE")
    if table_path and TABLE:
        lines = ["| runtime | type | activation | arch | export | loads | top-1 | KL mean | KL max | greedy |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(TABLE, key=lambda r: (r["runtime"], r["type"], r["act"], r["arch"])):
            if r.get("top1") is None:
                lines.append(f"| {r['runtime']} | {r['type']} | {r['act']} | {r['arch']} | {r['export']} | no | | | | |")
            else:
                lines.append(f"| {r['runtime']} | {r['type']} | {r['act']} | {r['arch']} | {r['export']} | yes | "
                             f"{r['top1']}/{r['positions']} | {r['kl_mean']:.1e} | {r['kl_max']:.1e} | "
                             f"{r['greedy']}/{N_GEN} |")
        Path(table_path).write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.mark.parametrize("arch", GGUF_ARCHITECTURES)
@pytest.mark.parametrize("act", ["relu2", "silu"])
@pytest.mark.parametrize("gguf_type", GGUF_TYPES)
def test_runtime_computes_our_model_or_the_export_is_refused(models, tmp_path, gguf_type, act, arch):
    model_dir, ref, ref_gen = models[act]
    gguf_file = tmp_path / f"{act}-{gguf_type}-{arch}.gguf"
    same_function = ARCH_ACTIVATION[arch] == act
    if same_function:
        report = export_gguf(model_dir, gguf_file, gguf_type, arch=arch)
        export = "ok"
    else:
        with pytest.raises(GGUFExportError, match=f"'{act}'.*arch '{arch}'"):
            export_gguf(model_dir, gguf_file, gguf_type, arch=arch)
        assert not gguf_file.exists()
        report = export_gguf(model_dir, gguf_file, gguf_type, arch=arch, allow_activation_mismatch=True)
        assert report.runtimes == ()
        export = "refused (forced)"
    for runtime in RUNTIMES:
        dump = tmp_path / f"{runtime}.bin"
        done = run_logits_dump(runtime, gguf_file, dump)
        row = {"runtime": runtime, "type": gguf_type, "act": act, "arch": arch, "export": export}
        TABLE.append(row)
        promised = same_function and runtime in report.runtimes
        loads_here = gguf_type in ("tq2_0", "tq1_0", "f16") if runtime == "llama.cpp" and arch == "bitnet" else (
            runtime == "bitnet.cpp")
        if not loads_here:
            assert done.returncode != 0 and "failed to load model" in done.stderr, (runtime, done.stderr[-500:])
            assert not promised, f"the runtime table promises {runtime} for {gguf_type}/{arch}, but it cannot load it"
            continue
        assert done.returncode == 0, done.stderr[-2000:]
        got, got_gen = read_dump(dump)
        assert got.shape == ref.shape
        result = compare(ref, ref_gen, got, got_gen)
        row.update(result)
        if same_function:
            assert promised, f"{runtime} computes our model from {gguf_type}/{arch} but the runtime table omits it"
            assert result["top1"] == len(IDS), result
            assert result["kl_mean"] < KL_MATCH, result
            assert got_gen == ref_gen, (got_gen, ref_gen)
        else:
            assert result["kl_mean"] > KL_DIFFERENT, f"{runtime} runs {arch} with {act} after all? {result}"
