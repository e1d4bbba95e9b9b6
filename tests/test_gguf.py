"""GGUF export/import: byte layouts of I2_S/TQ1_0/TQ2_0, bit-exact round trips, metadata, refusals."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from bitnet_torch import pack_ternary, quantize_weight
from bitnet_torch.export import (
    BitNetGGUFReader,
    CheckpointError,
    GGUFExportError,
    export_gguf,
    load_gguf,
)
from bitnet_torch.export.ternary_formats import (
    I2_S_TYPE_ID,
    pack_i2_s,
    pack_tq1_0,
    pack_tq2_0,
    ternary_from_f16,
    unpack_i2_s,
    unpack_tq1_0,
    unpack_tq2_0,
)
from bitnet_torch.export.tokenizer_metadata import TokenizerMetadataError
from test_gguf_helpers import PROJECTIONS, make_tiny_checkpoint

PACKERS = {
    "i2_s": (pack_i2_s, unpack_i2_s),
    "tq2_0": (pack_tq2_0, unpack_tq2_0),
    "tq1_0": (pack_tq1_0, unpack_tq1_0),
}


def random_ternary(n: int, k: int, seed: int, zero_rows: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.integers(-1, 2, size=(n, k), dtype=np.int8)
    w[:zero_rows] = 0  # whole zero blocks: block scale 0 in TQ types, code 1 in every slot
    return w


# ------------------------------------------------------------------------------------------ byte layouts


@pytest.mark.parametrize("gguf_type", sorted(PACKERS))
@pytest.mark.parametrize("shape", [(4, 256), (3, 512), (8, 768)])
def test_ternary_packers_round_trip_bit_exact(gguf_type, shape):
    pack, unpack = PACKERS[gguf_type]
    w_t = random_ternary(*shape, seed=shape[0] * 7 + shape[1])
    scale = 0.0371
    packed = pack(w_t, scale)
    back, back_scale = unpack(packed, *shape)
    assert back.dtype == np.int8 and back.shape == shape
    assert np.array_equal(back, w_t), f"{gguf_type}: {int((back != w_t).sum())} ternary values differ"
    stored = np.float32(scale) if gguf_type == "i2_s" else np.float16(scale)  # I2_S: fp32 trailer; TQ: fp16 d
    assert back_scale == float(stored)


@settings(max_examples=25, deadline=None)
@given(
    gguf_type=st.sampled_from(sorted(PACKERS)),
    n=st.integers(1, 9),
    blocks=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    scale=st.floats(1e-5, 10.0),
)
def test_ternary_packers_round_trip_for_any_shape_and_scale(gguf_type, n, blocks, seed, scale):
    pack, unpack = PACKERS[gguf_type]
    k = blocks * 256
    w_t = random_ternary(n, k, seed=seed, zero_rows=seed % 2)
    back, _ = unpack(pack(w_t, scale), n, k)
    assert np.array_equal(back, w_t)


@pytest.mark.parametrize("gguf_type", ["tq1_0", "tq2_0"])
def test_tq_packers_match_gguf_reference_quantizer_bytes(gguf_type):
    """Our packers (from the ternary codes) write exactly the bytes of gguf-py's TQ quantizer (from floats)."""
    qtype = gguf.GGMLQuantizationType[gguf_type.upper()]
    w_t = random_ternary(6, 512, seed=3)
    scale = np.float32(0.0213)
    ours = PACKERS[gguf_type][0](w_t, float(scale))
    reference = gguf.quants.quantize(w_t.astype(np.float32) * scale, qtype)
    assert ours.shape == reference.shape
    assert np.array_equal(ours, reference), f"{int((ours != reference).sum())} bytes differ from gguf.quants"
    dequantized = gguf.quants.dequantize(ours, qtype)
    assert np.array_equal(dequantized, w_t.astype(np.float32) * np.float32(np.float16(scale)))


def test_i2_s_layout_follows_bitnet_cpp_block_interleave():
    """Value j of a 128-value block sits in byte j % 32 at bit shift 6 - 2 * (j // 32); 32-byte fp32 trailer."""
    w_t = np.zeros((2, 128), dtype=np.int8)
    w_t[0, 5] = 1  # block 0, group 0, byte 5, bits 6-7 -> code 2
    w_t[0, 32 + 7] = -1  # block 0, group 1, byte 7, bits 4-5 -> code 0
    w_t[1, 96 + 31] = 1  # block 1, group 3, byte 31, bits 0-1 -> code 2
    packed = pack_i2_s(w_t, 0.5)
    assert packed.size == 2 * 128 // 4 + 32
    body = packed[:64]
    expected = np.full(64, 0x55, dtype=np.uint8)  # all-zero codes (1) in every slot
    expected[5] = (2 << 6) | (1 << 4) | (1 << 2) | 1
    expected[7] = (1 << 6) | (0 << 4) | (1 << 2) | 1
    expected[32 + 31] = (1 << 6) | (1 << 4) | (1 << 2) | 2
    assert np.array_equal(body, expected)
    assert np.array_equal(packed[64:].view(np.float32), np.full(8, 0.5, dtype=np.float32))


def test_packers_refuse_rows_that_do_not_fill_blocks_and_non_ternary_values():
    with pytest.raises(ValueError, match="blocks of 256"):
        pack_tq2_0(np.zeros((4, 128), dtype=np.int8), 1.0)
    with pytest.raises(ValueError, match="blocks of 128"):
        pack_i2_s(np.zeros((4, 64), dtype=np.int8), 1.0)
    with pytest.raises(ValueError, match="outside"):
        pack_tq1_0(np.full((1, 256), 2, dtype=np.int8), 1.0)


def test_unpack_detects_corrupt_code_3_and_mixed_block_scales():
    packed = pack_i2_s(np.zeros((1, 128), dtype=np.int8), 1.0)
    packed[0] = 0xFF
    with pytest.raises(ValueError, match="code 3"):
        unpack_i2_s(packed, 1, 128)
    tq = pack_tq2_0(random_ternary(2, 256, seed=1, zero_rows=0), 1.0)
    tq[1, 64:66] = np.array([0.5], dtype=np.float16).view(np.uint8)
    with pytest.raises(ValueError, match="different block scales"):
        unpack_tq2_0(tq, 2, 256)
    with pytest.raises(ValueError, match="not a ternary weight"):
        ternary_from_f16(np.array([[0.5, -0.25]], dtype=np.float16))


# ------------------------------------------------------------------------------------- checkpoint round trips


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {
        "packed": make_tiny_checkpoint(root / "packed", form="packed"),
        "float": make_tiny_checkpoint(root / "float", form="float"),
        "packed_divide": make_tiny_checkpoint(root / "divide", form="packed_divide", tie_word_embeddings=False),
        "silu": make_tiny_checkpoint(root / "silu", form="packed", hidden_act="silu"),
    }


def expected_projections(model_dir, form):
    """Packed weight + multiply-convention scale of every projection, computed independently of the exporter."""
    state = load_file(str(model_dir / "model.safetensors"))
    out = {}
    for name, tensor in state.items():
        if not any(name.endswith(p + ".weight") for p in PROJECTIONS):
            continue
        if form == "float":
            w_t, scale = quantize_weight(tensor)
            out[name] = (pack_ternary(w_t), float(scale))
        else:
            stored = float(state[name + "_scale"].float())
            out[name] = (tensor, stored if form == "packed" else 1.0 / stored)
    return out


@pytest.mark.parametrize(
    "form,gguf_type",
    [("packed", "i2_s"), ("packed", "tq2_0"), ("packed", "tq1_0"), ("packed", "f16"),
     ("float", "tq1_0"), ("packed_divide", "i2_s")],
)
def test_round_trip_hf_gguf_hf_is_bit_exact_for_ternary_weights(checkpoints, tmp_path, form, gguf_type):
    model_dir = checkpoints[form]
    out = tmp_path / f"model-{gguf_type}.gguf"
    report = export_gguf(model_dir, out, gguf_type, allow_untied_head=form == "packed_divide")
    assert report.verified_ternary_tensors == 2 * len(PROJECTIONS)
    assert report.tensor_types.get(gguf_type) == 2 * len(PROJECTIONS) + (2 if gguf_type == "f16" else 0) - (
        1 if gguf_type == "f16" and form != "packed_divide" else 0
    )
    config, state = load_gguf(out)
    expected = expected_projections(model_dir, form)
    for name, (packed, scale) in expected.items():
        assert torch.equal(state[name], packed), f"{gguf_type}: packed codes of {name} changed in the round trip"
        stored = state[name + "_scale"]
        assert stored.shape == (1,)
        assert float(stored.float()) == pytest.approx(scale, rel=1e-2 if stored.dtype == torch.bfloat16 else 1e-7)
    assert config["quantization_config"]["linear_class"] == "autobitlinear"
    assert config["quantization_config"]["quantization_mode"] == "offline"
    original = load_file(str(model_dir / "model.safetensors"))
    embed = original["model.embed_tokens.weight"].float()
    assert torch.allclose(state["model.embed_tokens.weight"].float(), embed, atol=1e-3, rtol=1e-3)
    assert torch.equal(state["model.norm.weight"].float(), original["model.norm.weight"].float())
    assert config["tie_word_embeddings"] == ("lm_head.weight" not in original)
    if "lm_head.weight" in original:
        assert "lm_head.weight" in state


@pytest.mark.parametrize("form,arch", [("packed", "bitnet-b1.58"), ("silu", "bitnet")])
def test_exported_file_reads_with_gguf_reader_and_carries_metadata(checkpoints, tmp_path, form, arch):
    """The architecture follows the FFN activation: relu2 -> bitnet-b1.58 (bitnet.cpp), silu -> bitnet (llama.cpp)."""
    out = tmp_path / "m.gguf"
    report = export_gguf(checkpoints[form], out, "tq2_0")
    assert report.arch == arch
    assert report.runtimes == (("bitnet.cpp", "llama.cpp") if arch == "bitnet" else ("bitnet.cpp",))
    reader = gguf.GGUFReader(out)  # the unmodified reader handles TQ files
    fields = {k: f.contents() for k, f in reader.fields.items()}
    config = json.loads((checkpoints[form] / "config.json").read_text())
    assert fields["general.architecture"] == arch
    assert fields[f"{arch}.block_count"] == config["num_hidden_layers"]
    assert fields[f"{arch}.embedding_length"] == config["hidden_size"]
    assert fields[f"{arch}.feed_forward_length"] == config["intermediate_size"]
    assert fields[f"{arch}.attention.head_count"] == 4 and fields[f"{arch}.attention.head_count_kv"] == 2
    assert fields[f"{arch}.rope.freq_base"] == 500000.0
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_TQ2_0
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    tokenizer = json.loads((checkpoints[form] / "tokenizer.json").read_text())
    assert len(fields["tokenizer.ggml.tokens"]) == config["vocab_size"]
    assert fields["tokenizer.ggml.tokens"][0] == "<|begin_of_text|>"
    assert fields["tokenizer.ggml.tokens"][-1].startswith("[PAD")
    assert fields["tokenizer.ggml.token_type"][0] == gguf.TokenType.CONTROL
    assert len(fields["tokenizer.ggml.merges"]) == len(tokenizer["model"]["merges"])
    assert fields["tokenizer.ggml.bos_token_id"] == 0 and fields["tokenizer.ggml.eos_token_id"] == 1
    assert fields["tokenizer.ggml.eot_token_id"] == 2
    assert "<|eot_id|>" in fields["tokenizer.chat_template"]
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "output_norm.weight", "blk.1.attn_sub_norm.weight", "blk.1.ffn_sub_norm.weight",
            "blk.0.attn_q.weight", "blk.0.ffn_down.weight"} <= names
    assert "output.weight" not in names  # tied lm_head is not duplicated
    q = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    assert q.tensor_type == gguf.GGMLQuantizationType.TQ2_0 and list(q.shape) == [256, 256]


def test_i2_s_file_has_bitnet_cpp_type_and_architecture(checkpoints, tmp_path):
    out = tmp_path / "m.gguf"
    export_gguf(checkpoints["packed"], out, "i2_s")
    reader = BitNetGGUFReader(out)
    assert reader.get_field("general.architecture").contents() == "bitnet-b1.58"
    assert reader.get_field("general.file_type").contents() == 40
    down = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    assert int(down.tensor_type) == I2_S_TYPE_ID and down.n_bytes == 256 * 512 // 4 + 32
    with pytest.raises(ValueError):
        gguf.GGUFReader(out)  # gguf-py alone does not know type 36: why BitNetGGUFReader exists


def test_rows_not_filling_a_block_fall_back_to_f16_and_still_round_trip(tmp_path):
    model_dir = make_tiny_checkpoint(tmp_path / "odd", form="packed", hidden_size=192, intermediate_size=256)
    report = export_gguf(model_dir, tmp_path / "odd.gguf", "tq2_0")
    assert len(report.fallbacks) == 2 * 6  # q, k, v, o, gate, up have 192 columns; down has 256
    assert report.tensor_types["tq2_0"] == 2
    _, state = load_gguf(tmp_path / "odd.gguf")
    for name, (packed, _) in expected_projections(model_dir, "packed").items():
        assert torch.equal(state[name], packed)


# ------------------------------------------------------------------------------------------------- refusals


def test_export_refuses_bad_inputs_with_named_causes(checkpoints, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        export_gguf(tmp_path / "missing", tmp_path / "x.gguf")
    with pytest.raises(GGUFExportError, match="unknown GGUF type"):
        export_gguf(checkpoints["packed"], tmp_path / "x.gguf", "q4_0")
    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tok / name).write_bytes((checkpoints["packed"] / name).read_bytes())
    with pytest.raises(TokenizerMetadataError, match="no tokenizer.json"):
        export_gguf(no_tok, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text('{"model_type": "bitnet"}')
    (pickled / "pytorch_model.bin").write_bytes(b"\x80")
    with pytest.raises(CheckpointError, match="pickle"):
        export_gguf(pickled, tmp_path / "x.gguf")
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(GGUFExportError, match="not BitNet"):
        export_gguf(llama, tmp_path / "x.gguf")


def test_export_refuses_tensors_the_gguf_architecture_cannot_hold(checkpoints, tmp_path):
    from safetensors.torch import save_file

    odd = tmp_path / "bias"
    odd.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (odd / name).write_bytes((checkpoints["packed"] / name).read_bytes())
    state = load_file(str(checkpoints["packed"] / "model.safetensors"))
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(256)
    save_file(state, str(odd / "model.safetensors"))
    with pytest.raises(GGUFExportError, match="q_proj.bias"):
        export_gguf(odd, tmp_path / "x.gguf")


def test_load_gguf_refuses_missing_and_non_gguf_files(tmp_path):
    with pytest.raises(GGUFExportError, match="not found"):
        load_gguf(tmp_path / "none.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(GGUFExportError, match="not a readable GGUF"):
        load_gguf(junk)


def test_model_from_gguf_builds_the_packed_model(checkpoints, tmp_path):
    from bitnet_torch import BitNetForCausalLM

    out = tmp_path / "m.gguf"
    export_gguf(checkpoints["packed"], out, "i2_s", embedding_type="f32")
    from_gguf = BitNetForCausalLM.from_gguf(out)
    from_dir = BitNetForCausalLM.from_pretrained(checkpoints["packed"], packed=True)
    state = from_gguf.state_dict()
    for name, (packed, _) in expected_projections(checkpoints["packed"], "packed").items():
        assert torch.equal(state[name], packed), f"{name} differs after GGUF -> model"
    ids = torch.tensor([[0, 5, 17, 42, 99, 3]])
    with torch.no_grad():
        assert torch.equal(from_gguf(ids).logits, from_dir(ids).logits), "GGUF model computes differently"


def test_pre_tokenizer_names_follow_llama_cpp():
    """A Llama-3 style Split regex is llama.cpp's "llama-bpe"; GPT-2's ByteLevel regex is "gpt-2"."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    from bitnet_torch.export.tokenizer_metadata import PRE_TOKENIZER_REGEXES, _pre_tokenizer_name

    def serialized(pre):
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre
        return json.loads(tok.to_str())

    llama3 = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRE_TOKENIZER_REGEXES["llama-bpe"]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    assert _pre_tokenizer_name(serialized(llama3)) == "llama-bpe"
    assert _pre_tokenizer_name(serialized(pre_tokenizers.ByteLevel(add_prefix_space=False))) == "gpt-2"
    with pytest.raises(TokenizerMetadataError, match="pre_tokenizer="):
        _pre_tokenizer_name(serialized(pre_tokenizers.Split(Regex(r"\s+"), behavior="isolated")))


def test_import_of_a_file_with_standard_keys_only_rebuilds_config_and_scales(checkpoints, tmp_path):
    """Files from other converters carry no bitnet_torch.* keys: config and scales come from standard GGUF data."""
    out = tmp_path / "plain.gguf"
    export_gguf(checkpoints["packed"], out, "tq1_0", extra_metadata=False)
    assert BitNetGGUFReader(out).get_field("bitnet_torch.hf_config") is None
    config, state = load_gguf(out)
    original = json.loads((checkpoints["packed"] / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings"):
        assert config[key] == original[key], key
    assert config["model_type"] == "bitnet" and config["tie_word_embeddings"] is True
    for name, (packed, scale) in expected_projections(checkpoints["packed"], "packed").items():
        assert torch.equal(state[name], packed)
        assert float(state[name + "_scale"].float()) == pytest.approx(scale, rel=1e-3)  # fp16 block scale
