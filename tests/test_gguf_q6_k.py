"""Q6_K token embedding: our quantizer against gguf-py's independent dequantizer, the file layout, the exporter's
refusals, the import round trip and the CLI.

The reference is ``gguf.quants.dequantize`` (gguf-py's numpy port of ggml's ``dequantize_row_q6_K``); it shares no
code with :mod:`bitnet_torch.formats.q6_k`; the quantizer's choices are pinned to ggml's own (``llama-quantize``'s
bytes, hashed). The runtimes are checked in ``test_native_interop.py`` (opt-in).
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from bitnet_torch.cli import main
from bitnet_torch.export import GGUFExportError, export_gguf, load_gguf
from bitnet_torch.formats.gguf_reader import open_gguf
from bitnet_torch.formats.q6_k import Q6_K_BLOCK_BYTES, Q6_K_TYPE_ID, q6_k_nbytes, quantize_q6_k
from test_gguf_helpers import PROJECTIONS, make_tiny_checkpoint

#: Worst error of a value against the largest magnitude of its 256-value block: half a step of the largest
#: sub-block scale (max / 31.1 / 2 = 0.0161), a little more where a sub-block scale's int8 rounding makes its
#: largest value clamp at code -32. Measured over the distributions below: 0.0177 at most (uniform values).
BLOCK_ERROR_BOUND = 1 / 50
#: Relative RMS error (a uniform 6-bit grid on each 16 values: about max16 / 32 / sqrt(12)); measured 0.018
#: (normal) to 0.027 (lognormal).
RMS_ERROR_BOUND = 0.03
#: Plus, absolutely, the fp16 rounding of the super-scale d (about max / 4096) where it is subnormal (blocks whose
#: max is below about 0.25): d is off by up to 2**-25, a code by up to 32 * 128 of those.
D_SUBNORMAL_ERROR = 32 * 128 * 2.0**-25


def dequantize(data: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return gguf.quants.dequantize(data, gguf.GGMLQuantizationType.Q6_K).reshape(shape)


def block_error_ratio(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per 256-value block: (max |x - y| less the fp16-subnormal allowance) / max |x| (an all-zero block: its error)."""
    err = np.abs(x.astype(np.float64) - y).reshape(-1, 256).max(axis=1)
    amax = np.abs(x.astype(np.float64)).reshape(-1, 256).max(axis=1)
    subnormal = np.where(amax / 4096 < np.finfo(np.float16).tiny, D_SUBNORMAL_ERROR, 0.0)
    return np.where(amax > 0, np.maximum(err - subnormal, 0) / np.where(amax > 0, amax, 1), err)


@pytest.mark.parametrize("dist", ["normal", "uniform", "laplace", "lognormal"])
@pytest.mark.parametrize("scale", [1e-3, 0.02, 1.0, 300.0])
def test_q6_k_is_within_half_a_step_of_each_block_in_gguf_py(dist, scale):
    rng = np.random.default_rng(7)
    draw = {"normal": rng.standard_normal, "uniform": lambda s: rng.uniform(-1, 1, s),
            "laplace": lambda s: rng.laplace(size=s), "lognormal": lambda s: rng.lognormal(size=s)}[dist]
    x = (draw((24, 768)) * scale).astype(np.float32)
    data = quantize_q6_k(x)
    assert data.dtype == np.uint8 and data.shape == (24, 3 * Q6_K_BLOCK_BYTES)
    y = dequantize(data, x.shape)
    ratio = block_error_ratio(x, y)
    assert ratio.max() <= BLOCK_ERROR_BOUND, f"{dist} x {scale}: worst block error {ratio.max():.4f} of its max"
    rel_rms = np.sqrt(((y - x) ** 2).mean() / (x ** 2).mean())
    assert rel_rms < RMS_ERROR_BOUND, f"{dist} x {scale}: relative RMS error {rel_rms:.4f}"


@pytest.mark.parametrize("sign", [1, -1])
def test_q6_k_stores_representable_values_exactly(sign):
    """Sub-blocks of integer multiples k * s_j (k in -32..31, one k = -32; s_j = s / 2**e, the first the largest)
    are exactly a Q6_K block: d = -s/128 and scales -128 / 2**e (sign = -1 mirrors it: k in -31..32)."""
    rng = np.random.default_rng(3)
    n_blocks = 40
    k = rng.integers(-32, 32, size=(n_blocks, 16, 16))
    k[:, :, 0] = -32
    k = np.take_along_axis(k, rng.permuted(np.tile(np.arange(16), (n_blocks, 16, 1)), axis=2), axis=2)
    s = 2.0 ** rng.integers(-6, 4, size=(n_blocks, 1, 1))
    e = rng.integers(1, 8, size=(n_blocks, 16, 1))
    e[:, 0] = 0
    x = (sign * k * s / 2.0 ** e).astype(np.float32).reshape(4, n_blocks * 256 // 4)
    y = dequantize(quantize_q6_k(x), x.shape)
    assert np.array_equal(y, x), f"{int((y != x).sum())} of {x.size} representable values changed"


def golden_values(rows: int, cols: int) -> np.ndarray:
    """Deterministic awkward values (no RNG, no libm): cubed to give tails, 9 scales from 1/64 to 4 (small ones
    with a subnormal fp16 d), outliers every 11th row, a zero row and a half-zero row."""
    i = np.arange(rows, dtype=np.int64)[:, None]
    j = np.arange(cols, dtype=np.int64)[None, :]
    v = (((i * 7919 + j * 104729 + (i * j) % 613) % 2001) - 1000) / 1000.0
    v = v**3 * 2.0 ** (i % 9 - 6)
    v[::11, 7] *= 40.0
    v[5] = 0.0
    v[6, :128] = 0.0
    return v.astype(np.float32)


#: sha256 of upstream llama.cpp's ``llama-quantize --token-embedding-type q6_k`` output (ggml-org 82bb48500, the
#: build in /work/shared/tools/native) for ``golden_values(308, 256)`` as a token embedding.
LLAMA_QUANTIZE_SHA256 = "352a4f8b0a63ba242295dde8b60cfecb7427b4cc479216895486fde05a244023"


def test_q6_k_bytes_equal_ggml_reference_quantizer_on_golden_values():
    """The whole of ggml's algorithm (trial scales, int8 sub-scales, zero handling, packing), not only its decoder."""
    import hashlib

    digest = hashlib.sha256(quantize_q6_k(golden_values(308, 256)).tobytes()).hexdigest()
    assert digest == LLAMA_QUANTIZE_SHA256, "Q6_K bytes differ from llama-quantize's for the golden values"


def test_q6_k_all_zero_blocks_are_zero_bytes():
    x = np.zeros((3, 512), np.float32)
    x[1, 256:] = np.linspace(-1, 1, 256, dtype=np.float32)
    data = quantize_q6_k(x).reshape(6, Q6_K_BLOCK_BYTES)
    assert not data[[0, 1, 2, 4, 5]].any(), "an all-zero block must be stored as zeros (d = 0)"
    y = dequantize(data, x.shape)
    assert np.array_equal(y[[0, 2]], x[[0, 2]]) and np.array_equal(y[1, :256], x[1, :256])
    assert block_error_ratio(x[1:2, 256:], y[1:2, 256:]).max() <= BLOCK_ERROR_BOUND


def test_q6_k_outlier_costs_only_its_own_block():
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((2, 1024)) * 0.02).astype(np.float32)
    x[0, 300] = 1000.0  # block 1 of row 0
    y = dequantize(quantize_q6_k(x), x.shape)
    ratio = block_error_ratio(x, y).reshape(2, 4)
    assert ratio.max() <= BLOCK_ERROR_BOUND
    assert abs(y[0, 300] - 1000.0) <= 1000.0 / 62, y[0, 300]
    others = np.delete(ratio.ravel(), 1)
    assert others.max() <= BLOCK_ERROR_BOUND
    clean = np.delete(np.abs(y - x).reshape(8, 256), 1, axis=0).max()
    assert clean < 0.02 * 5 / 60, f"blocks without the outlier lost precision: max error {clean}"
    # inside the outlier's block, small values are flushed towards zero but stay within the bound
    assert np.abs(y[0, 256:512] - x[0, 256:512]).max() <= 1000.0 / 60


def test_q6_k_negative_only_values_keep_their_sign():
    rng = np.random.default_rng(9)
    x = -np.abs(rng.standard_normal((8, 256)) * 0.5).astype(np.float32)
    y = dequantize(quantize_q6_k(x), x.shape)
    assert (y <= 0).all(), "a negative value came back positive"
    assert block_error_ratio(x, y).max() <= BLOCK_ERROR_BOUND


def test_q6_k_refuses_non_finite_values_and_ragged_rows():
    x = np.zeros((4, 256), np.float32)
    for bad in (np.nan, np.inf, -np.inf):
        x[2, 17] = bad
        with pytest.raises(ValueError, match="non-finite values: row 2, column 17"):
            quantize_q6_k(x)
    with pytest.raises(ValueError, match="multiple of 256; got rows of 320"):
        quantize_q6_k(np.zeros((2, 320), np.float32))
    with pytest.raises(ValueError, match="2-D"):
        quantize_q6_k(np.zeros(256, np.float32))
    with pytest.raises(ValueError, match="fp16 block scale"):
        quantize_q6_k(np.full((1, 256), 1e30, np.float32))


def test_q6_k_progress_sees_every_chunk():
    seen = []

    def progress(starts):
        for s in starts:
            seen.append(s)
            yield s

    x = np.ones((2100, 256), np.float32)
    quantize_q6_k(x, progress=progress)
    assert seen[0] == 0 and len(seen) > 1 and seen == sorted(seen)


# ------------------------------------------------------------------------------------------------ export / import


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("q6k") / "packed", form="packed", embedding_std=0.2)


def test_export_writes_token_embd_as_q6_k_and_imports_it_back(checkpoint, tmp_path):
    out = tmp_path / "m.gguf"
    report = export_gguf(checkpoint, out, "i2_s", embedding_type="q6_k")
    assert report.tensor_types == {"i2_s": 2 * len(PROJECTIONS), "q6_k": 1, "f32": 2 * 4 + 1}  # norms
    assert report.verified_ternary_tensors == 2 * len(PROJECTIONS)
    embed = load_file(str(checkpoint / "model.safetensors"))["model.embed_tokens.weight"].float().numpy()
    rows, cols = embed.shape
    reader = open_gguf(out)
    tensor = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert int(tensor.tensor_type) == Q6_K_TYPE_ID == int(gguf.GGMLQuantizationType.Q6_K)
    assert int(tensor.n_bytes) == rows * cols // 256 * 210 == q6_k_nbytes(rows, cols)
    assert "output.weight" not in {t.name for t in reader.tensors}
    assert np.array_equal(np.asarray(tensor.data).reshape(rows, -1), quantize_q6_k(embed))
    config, state = load_gguf(out)
    back = state["model.embed_tokens.weight"].float().numpy()
    assert np.array_equal(back, dequantize(quantize_q6_k(embed), embed.shape).astype(np.float32))
    assert block_error_ratio(embed, back).max() <= BLOCK_ERROR_BOUND
    assert config["tie_word_embeddings"] is True


def test_q6_k_model_from_gguf_computes_nearly_the_checkpoint(checkpoint, tmp_path):
    from bitnet_torch import BitNetForCausalLM

    out = tmp_path / "m.gguf"
    export_gguf(checkpoint, out, "tq2_0", embedding_type="q6_k")
    from_gguf = BitNetForCausalLM.from_gguf(out, dtype=torch.float32).eval()
    from_dir = BitNetForCausalLM.from_pretrained(checkpoint, packed=True, dtype=torch.float32).eval()
    ids = torch.tensor([[0, 5, 17, 42, 99, 3, 77, 120, 200, 250]])
    with torch.no_grad():
        a, b = from_dir(ids).logits.log_softmax(-1), from_gguf(ids).logits.log_softmax(-1)
    kl = (a.exp() * (a - b)).sum(-1)
    # measured: KL 3e-8 .. 6e-3 per position (the tied head's logits move by ~2% of the embedding's RMS)
    assert kl.max() < 2e-2, f"Q6_K embedding changed the model too much: KL {kl.tolist()}"
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_q6_k_export_refuses_hidden_sizes_that_are_not_a_multiple_of_256(tmp_path):
    model_dir = make_tiny_checkpoint(tmp_path / "h128", form="packed", hidden_size=128, intermediate_size=256)
    out = tmp_path / "m.gguf"
    with pytest.raises(GGUFExportError, match="hidden size to be a multiple of 256.*hidden_size 128"):
        export_gguf(model_dir, out, "i2_s", embedding_type="q6_k")
    assert not out.exists() and not list(tmp_path.glob("*.partial"))
    with pytest.raises(GGUFExportError, match="embedding_type must be one of 'f16', 'f32', 'q6_k'"):
        export_gguf(model_dir, out, "i2_s", embedding_type="q8_0")


def test_q6_k_export_refuses_a_non_finite_embedding_and_leaves_nothing(checkpoint, tmp_path):
    model_dir = tmp_path / "nan"
    model_dir.mkdir()
    for f in checkpoint.iterdir():
        (model_dir / f.name).write_bytes(f.read_bytes())
    state = load_file(str(model_dir / "model.safetensors"))
    state["model.embed_tokens.weight"][3, 100] = float("nan")
    save_file(state, str(model_dir / "model.safetensors"))
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")
    with pytest.raises(GGUFExportError, match=r"token_embd.weight .*Q6_K.*non-finite values: row 3, column 100"):
        export_gguf(model_dir, out, "i2_s", embedding_type="q6_k", overwrite=True)
    assert out.read_bytes() == b"old" and not list(tmp_path.glob(".m.gguf.*"))


def test_cli_exports_a_q6_k_embedding(checkpoint, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    code = main(["export", "gguf", str(checkpoint), str(out), "--type", "i2_s", "--embedding-type", "q6_k"])
    printed = capsys.readouterr().out
    assert code == 0 and "1 Q6_K" in printed and "verified: 14 ternary tensors" in printed, printed
    assert int(next(t for t in open_gguf(out).tensors if t.name == "token_embd.weight").tensor_type) == 14


def test_q6_k_untied_head_is_written_and_read_back_as_q6_k_too(tmp_path):
    model_dir = make_tiny_checkpoint(tmp_path / "untied", form="packed", tie_word_embeddings=False, head_std=0.2)
    out = tmp_path / "m.gguf"
    report = export_gguf(model_dir, out, "tq2_0", embedding_type="q6_k", allow_untied_head=True)
    assert report.tensor_types["q6_k"] == 2
    types = {t.name: int(t.tensor_type) for t in open_gguf(out).tensors}
    assert types["token_embd.weight"] == types["output.weight"] == Q6_K_TYPE_ID
    original = load_file(str(model_dir / "model.safetensors"))
    config, state = load_gguf(out)
    assert config["tie_word_embeddings"] is False
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        x = original[name].float().numpy()
        assert block_error_ratio(x, state[name].float().numpy()).max() <= BLOCK_ERROR_BOUND, name
