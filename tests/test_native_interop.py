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

A Q6_K token embedding (``--embedding-type q6_k``) runs in both runtimes as our model (up to its rounding), and its
bytes equal those of ggml's own ``llama-quantize``.

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
from bitnet_torch.formats.gguf_layout import ARCH_ACTIVATION, ARCH_FOR_ACTIVATION, GGUF_ARCHITECTURES, GGUF_TYPES
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


# ------------------------------------------------------------------------------------------- Q6_K token embedding

#: Measured (embedding std 0.2), ``--embedding-type q6_k``: bitnet.cpp, relu2, i2_s: KL mean 3.3e-4 (max 5.8e-3)
#: against our fp32 checkpoint (the F16 file: 9.0e-5), 7.3e-5 against our own model read back from the same file
#: (the F16 file against its own: 8.8e-5); llama.cpp, silu, tq2_0: 2.3e-4 and 4.3e-5. Top-1 32/32, greedy 8/8 in all.
KL_Q6_K = KL_MATCH


@pytest.mark.parametrize("runtime,act,gguf_type", [("bitnet.cpp", "relu2", "i2_s"), ("llama.cpp", "silu", "tq2_0")])
def test_runtime_runs_a_q6_k_token_embedding_as_our_model(models, tmp_path, runtime, act, gguf_type):
    """``export gguf --type i2_s --embedding-type q6_k``: bitnet.cpp computes the checkpoint's logits up to the
    Q6_K rounding of the tied head, and our own import of the same file computes what bitnet.cpp computes;
    likewise upstream llama.cpp with a silu model in tq2_0."""
    from bitnet_torch.cli import main

    model_dir, ref, ref_gen = models[act]
    gguf_file = tmp_path / f"{act}-{gguf_type}-q6_k.gguf"
    argv = ["export", "gguf", str(model_dir), str(gguf_file), "--type", gguf_type, "--embedding-type", "q6_k"]
    assert main(argv) == 0
    done = run_logits_dump(runtime, gguf_file, tmp_path / "dump.bin")
    assert done.returncode == 0, done.stderr[-2000:]
    got, got_gen = read_dump(tmp_path / "dump.bin")
    result = compare(ref, ref_gen, got, got_gen)
    TABLE.append({"runtime": runtime, "type": f"{gguf_type} + q6_k emb", "act": act, "arch": ARCH_FOR_ACTIVATION[act],
                  "export": "ok", **result})
    assert result["top1"] == len(IDS) and result["kl_mean"] < KL_Q6_K and got_gen == ref_gen, result
    ours = BitNetForCausalLM.from_gguf(gguf_file, dtype=torch.float32).eval()
    x = torch.tensor([IDS])
    with torch.no_grad():
        own = ours(x).logits[0].numpy()
        own_gen = ours.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=N_GEN, do_sample=False,
                                pad_token_id=0)[0, len(IDS):].tolist()
    same_file = compare(own, own_gen, got, got_gen)
    assert same_file["top1"] == len(IDS) and same_file["kl_mean"] < KL_Q6_K and got_gen == own_gen, same_file


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_q6_k_bytes_equal_llama_quantize(tmp_path, runtime):
    """ggml's own quantizer (``llama-quantize --token-embedding-type q6_k``: ``quantize_row_q6_K_ref``) writes the
    same bytes as ours for embeddings of several distributions and scales (a zero row and an outlier included).

    Upstream llama.cpp: every block (measured: 308/308). bitnet.cpp's build fuses the multiply-adds of
    ``make_qx_quants``' sums, so a near-tie between two trial scales can go the other way: measured 5 of 308
    blocks with one sub-block scale one or three steps apart (same super-scale d; total squared error 1.0000002x).
    """
    import gguf
    from safetensors.torch import load_file, save_file

    from bitnet_torch.formats.q6_k import quantize_q6_k

    model_dir = make_tiny_checkpoint(tmp_path / "silu", form="packed", hidden_act="silu")
    state = load_file(str(model_dir / "model.safetensors"))
    shape = state["model.embed_tokens.weight"].shape
    g = torch.Generator().manual_seed(11)
    parts = [torch.randn(shape, generator=g) * s for s in (1e-3, 0.02, 1.0, 50.0)]
    parts += [torch.rand(shape, generator=g) * 2 - 1, (1 - torch.rand(shape, generator=g)).log()]  # uniform, -Exp(1)
    rows = torch.arange(shape[0])
    values = torch.stack(parts)[rows % len(parts), rows]
    values[3] = 0.0
    values[5, 40] = 1e4
    state["model.embed_tokens.weight"] = values.contiguous()
    save_file(state, str(model_dir / "model.safetensors"))
    source = tmp_path / "f32emb.gguf"
    export_gguf(model_dir, source, "f16", embedding_type="f32")
    quantized = tmp_path / "ggml-q6_k.gguf"
    done = subprocess.run([NATIVE_RUN, runtime, "llama-quantize", "--token-embedding-type", "q6_k", str(source),
                           str(quantized), "F16"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = next(t for t in gguf.GGUFReader(quantized).tensors if t.name == "token_embd.weight")
    assert int(theirs.tensor_type) == int(gguf.GGMLQuantizationType.Q6_K)
    theirs = np.asarray(theirs.data).reshape(-1, 210)
    ours = quantize_q6_k(values.numpy()).reshape(-1, 210)
    differ = (ours != theirs).any(axis=1)
    if runtime == "llama.cpp":
        assert not differ.any(), f"{int(differ.sum())} of {len(differ)} Q6_K blocks differ from llama-quantize's"
        return
    assert differ.mean() < 0.05, f"{int(differ.sum())} of {len(differ)} Q6_K blocks differ from llama-quantize's"
    assert np.array_equal(ours[:, 208:], theirs[:, 208:]), "a super-scale d differs from llama-quantize's"
    assert ((ours[:, 192:208] != theirs[:, 192:208]).sum(axis=1) <= 1).all(), "more than one sub-block scale differs"
    x = values.numpy().reshape(-1, 256).astype(np.float64)
    err = [((gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q6_K).reshape(x.shape) - x) ** 2).sum()
           for q in (ours, theirs)]
    assert err[0] <= 1.01 * err[1], f"our squared error {err[0]:.4g} is above llama-quantize's {err[1]:.4g}"
