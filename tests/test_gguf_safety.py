"""GGUF export/import safety: nothing overwritten unasked, all-or-nothing writes, configs checked against tensors,
clear errors for corrupt files, and the FFN activation each runtime really computes (issues 14 and 15)."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import time
from pathlib import Path

import gguf
import pytest
import torch
from safetensors.torch import load_file, save_file

from bitnet_torch.export import CheckpointError, GGUFExportError, export_gguf, load_gguf
from bitnet_torch.formats import GGUFError
from test_gguf_helpers import make_tiny_checkpoint, rewrite_gguf

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    return {
        "relu2": make_tiny_checkpoint(root / "relu2", form="packed"),
        "silu": make_tiny_checkpoint(root / "silu", form="packed", hidden_act="silu"),
    }


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def copy_checkpoint(src: Path, dst: Path, config_changes: dict | None = None) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    if config_changes:
        config = json.loads((dst / "config.json").read_text())
        config.update(config_changes)
        (dst / "config.json").write_text(json.dumps(config))
    return dst


# ------------------------------------------------------------------------------------------------ layering


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_models_and_formats_never_import_export():
    """Reading GGUF sits below models (formats/); models must not reach up into export (the former circle)."""
    offenders = []
    for layer in ("models", "formats"):
        for path in sorted((REPO / "bitnet_torch" / layer).glob("*.py")):
            for name in _imported_modules(path):
                if name.lstrip(".").split(".")[0] in ("export", "training", "cli") or "bitnet_torch.export" in name:
                    offenders.append(f"{path.relative_to(REPO)} imports {name}")
            if layer == "formats":
                offenders += [f"{path.relative_to(REPO)} imports {n}" for n in _imported_modules(path)
                              if n.startswith("..models")]
    assert not offenders, offenders


# --------------------------------------------------------------------------------------- overwrite, atomicity


def test_export_refuses_an_existing_output_unless_overwrite(ckpt, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"precious")
    with pytest.raises(GGUFExportError, match="already exists.*--overwrite"):
        export_gguf(ckpt["relu2"], out, "tq2_0")
    assert out.read_bytes() == b"precious"
    export_gguf(ckpt["relu2"], out, "tq2_0", overwrite=True)
    assert out.read_bytes()[:4] == b"GGUF"
    mask = os.umask(0o022)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask  # a normal file, not the temporary file's 0600


@pytest.mark.parametrize("victim", ["model.safetensors", "config.json", "tokenizer.json"])
def test_export_never_writes_into_the_source_checkpoint(ckpt, tmp_path, victim):
    model_dir = copy_checkpoint(ckpt["relu2"], tmp_path / "ck")
    before = {f.name: digest(f) for f in model_dir.iterdir()}
    for out in (model_dir / victim, tmp_path / "ck" / ".." / "ck" / victim):
        with pytest.raises(GGUFExportError, match="source checkpoint"):
            export_gguf(model_dir, out, "tq2_0", overwrite=True)
    link = tmp_path / "hardlink.gguf"
    os.link(model_dir / victim, link)  # another name for the same file is still the checkpoint's file
    with pytest.raises(GGUFExportError, match="source checkpoint"):
        export_gguf(model_dir, link, "tq2_0", overwrite=True)
    assert {f.name: digest(f) for f in model_dir.iterdir()} == before


def test_cli_export_onto_the_checkpoint_is_one_error_line(ckpt, tmp_path, capsys):
    from bitnet_torch.cli import main

    model_dir = copy_checkpoint(ckpt["relu2"], tmp_path / "ck")
    before = digest(model_dir / "model.safetensors")
    code = main(["export", "gguf", str(model_dir), str(model_dir / "model.safetensors"), "--overwrite"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: ") and "source checkpoint" in err and err.count("\n") == 1
    assert digest(model_dir / "model.safetensors") == before
    out = tmp_path / "x.gguf"
    out.write_bytes(b"keep")
    assert main(["export", "gguf", str(model_dir), str(out)]) == 1
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == b"keep"
    assert main(["export", "gguf", str(model_dir), str(out), "--overwrite"]) == 0
    assert out.read_bytes()[:4] == b"GGUF"


@pytest.mark.parametrize("where", ["write", "verify"])
def test_an_interrupted_export_leaves_nothing_and_keeps_the_old_file(ckpt, tmp_path, monkeypatch, where):
    """KeyboardInterrupt while writing the tensors or while verifying: no partial file, the previous output intact."""
    import bitnet_torch.export.gguf as export_module

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    if where == "write":
        monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", interrupt)
    else:
        monkeypatch.setattr(export_module, "verify_gguf", interrupt)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "m.gguf"
    out.write_bytes(b"previous export")
    with pytest.raises(KeyboardInterrupt):
        export_gguf(ckpt["relu2"], out, "i2_s", overwrite=True)
    assert sorted(p.name for p in out_dir.iterdir()) == ["m.gguf"]
    assert out.read_bytes() == b"previous export"


# ------------------------------------------------------------------------------------- config vs tensors


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"num_hidden_layers": 3}, "num_hidden_layers=3 but the tensors hold 2 layers"),
        ({"num_hidden_layers": 1}, "num_hidden_layers=1 but the tensors hold 2 layers"),
        ({"hidden_size": 512}, "model.embed_tokens.weight has shape"),
        ({"num_key_value_heads": 4}, r"k_proj.weight has shape \[128, 256\] but .* implies \[256, 256\]"),
        ({"head_dim": 32}, r"q_proj.weight has shape \[256, 256\] but .* implies \[128, 256\]"),
        ({"intermediate_size": 768}, r"gate_proj.weight has shape"),
        ({"vocab_size": 400}, "embed_tokens"),
        ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer"),
    ],
)
def test_export_refuses_a_config_that_contradicts_the_tensors(ckpt, tmp_path, changes, match):
    model_dir = copy_checkpoint(ckpt["relu2"], tmp_path / "ck", changes)
    out = tmp_path / "x.gguf"
    with pytest.raises(GGUFExportError, match=match):
        export_gguf(model_dir, out, "tq2_0")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_export_refuses_a_zero_scale_in_the_divide_convention(tmp_path):
    model_dir = make_tiny_checkpoint(tmp_path / "div", form="packed_divide")
    state = load_file(str(model_dir / "model.safetensors"))
    state["model.layers.1.mlp.up_proj.weight_scale"] = torch.zeros(1)
    save_file(state, str(model_dir / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"layers\.1\.mlp\.up_proj\.weight_scale is 0.0 \(divide"):
        export_gguf(model_dir, tmp_path / "x.gguf", "i2_s")
    state["model.layers.1.mlp.up_proj.weight_scale"] = torch.tensor([float("nan")])
    save_file(state, str(model_dir / "model.safetensors"))
    with pytest.raises(CheckpointError, match="is nan"):
        export_gguf(model_dir, tmp_path / "x.gguf", "i2_s")


# ----------------------------------------------------------------------------------------- corrupt GGUF files


@pytest.fixture(scope="module")
def good_gguf(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("good") / "m.gguf"
    export_gguf(ckpt["relu2"], out, "tq2_0")
    return out


def test_an_embedded_config_with_absurd_layers_is_refused_at_once(good_gguf, tmp_path):
    config = json.loads(gguf.GGUFReader(good_gguf).get_field("bitnet_torch.hf_config").contents())
    for layers in (10**6, 30_000_000):
        config["num_hidden_layers"] = layers
        bad = rewrite_gguf(good_gguf, tmp_path / f"l{layers}.gguf", {"bitnet_torch.hf_config": json.dumps(config)})
        started = time.perf_counter()
        with pytest.raises(GGUFError, match=f"num_hidden_layers={layers} but the tensors hold 2 layers"):
            load_gguf(bad)
        assert time.perf_counter() - started < 5.0
    bad = rewrite_gguf(good_gguf, tmp_path / "std.gguf", {"bitnet-b1.58.block_count": 30_000_000},
                       drop_fields=("bitnet_torch.hf_config",))
    with pytest.raises(GGUFError, match="num_hidden_layers=30000000"):
        load_gguf(bad)
    bad = rewrite_gguf(good_gguf, tmp_path / "nokey.gguf", drop_fields=("bitnet_torch.hf_config",
                                                                         "bitnet-b1.58.feed_forward_length"))
    with pytest.raises(GGUFError, match="no bitnet-b1.58.feed_forward_length"):
        load_gguf(bad)


def test_a_gguf_missing_a_tensor_is_refused_not_initialised(good_gguf, tmp_path):
    """A checkpoint folder may lack tensors (initialised and reported, as in Transformers); a GGUF file is whole by
    construction, so a missing tensor is a broken file and must not be filled with random values."""
    from bitnet_torch import BitNetForCausalLM

    bad = rewrite_gguf(good_gguf, tmp_path / "missing.gguf", drop_tensors=("blk.0.attn_norm.weight",))
    with pytest.raises(GGUFError, match="tensor model.layers.0.input_layernorm.weight is missing"):
        BitNetForCausalLM.from_gguf(bad)


@pytest.mark.parametrize(
    "value,match",
    [
        ("{not json", "hf_config is not valid JSON"),
        ("[1, 2]", "JSON list, not an object"),
        ('{"model_type": "bitnet"}', "has no 'num_hidden_layers'"),
        ('{"model_type": "bitnet", "num_hidden_layers": 2, "hidden_size": 256, "vocab_size": 308}',
         "has no 'intermediate_size'"),
    ],
)
def test_a_broken_embedded_config_is_a_clear_error(good_gguf, tmp_path, value, match):
    bad = rewrite_gguf(good_gguf, tmp_path / "bad.gguf", {"bitnet_torch.hf_config": value})
    with pytest.raises(GGUFError, match=match):
        load_gguf(bad)


def test_a_gguf_truncated_anywhere_in_its_header_is_a_clear_error(good_gguf, tmp_path):
    data = good_gguf.read_bytes()
    reader = gguf.GGUFReader(good_gguf)
    kv_end = reader.data_offset  # header + key/value + tensor-info sections end here
    cuts = sorted({3, 8, 20, 30, 100, 1000, kv_end // 3, kv_end // 2, kv_end - 40, kv_end - 1, len(data) - 100})
    for cut in cuts:
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(GGUFError, match="truncated|corrupt|not a readable GGUF") as info:
            load_gguf(bad)
        assert str(bad) in str(info.value)


# ------------------------------------------------------------------------------------------ FFN activation


def test_relu2_model_to_arch_bitnet_is_refused_naming_runtime_and_activation(ckpt, tmp_path):
    out = tmp_path / "x.gguf"
    for gguf_type in ("tq2_0", "tq1_0", "f16", "i2_s"):
        with pytest.raises(GGUFExportError, match=r"'relu2'.*llama\.cpp.*'bitnet'.*'silu'.*--allow-activation-mismatch"
                           if gguf_type != "i2_s" else r"'relu2'.*bitnet\.cpp run arch 'bitnet'.*'silu'"):
            export_gguf(ckpt["relu2"], out, gguf_type, arch="bitnet")
    assert not out.exists()
    report = export_gguf(ckpt["relu2"], out, "tq2_0", arch="bitnet", allow_activation_mismatch=True)
    assert report.arch == "bitnet" and report.runtimes == ()
    assert any("no runtime computes this model" in note for note in report.notes)


def test_silu_model_to_a_relu2_arch_is_refused_and_defaults_to_bitnet(ckpt, tmp_path):
    for arch in ("bitnet-b1.58", "bitnet-25"):
        with pytest.raises(GGUFExportError, match=rf"'silu'.*arch '{arch}'.*'relu2'.*write arch 'bitnet'"):
            export_gguf(ckpt["silu"], tmp_path / "x.gguf", "tq2_0", arch=arch)
    report = export_gguf(ckpt["silu"], tmp_path / "i2.gguf", "i2_s")
    assert report.arch == "bitnet" and report.runtimes == ("bitnet.cpp",)
    report = export_gguf(ckpt["silu"], tmp_path / "tq.gguf", "tq1_0")
    assert report.arch == "bitnet" and report.runtimes == ("bitnet.cpp", "llama.cpp")


def test_an_activation_no_runtime_computes_is_refused(ckpt, tmp_path):
    model_dir = copy_checkpoint(ckpt["relu2"], tmp_path / "gelu", {"hidden_act": "gelu"})
    with pytest.raises(GGUFExportError, match="'gelu'.*no GGUF BitNet architecture computes it"):
        export_gguf(model_dir, tmp_path / "x.gguf", "tq2_0")


@pytest.mark.parametrize("act,arch", [("silu", "bitnet"), ("relu2", "bitnet-b1.58")])
def test_a_standard_keys_only_file_imports_with_the_activation_its_arch_computes(ckpt, tmp_path, act, arch):
    """Files from other converters carry no config.json: the activation is the architecture graph's."""
    out = tmp_path / "plain.gguf"
    export_gguf(ckpt[act], out, "tq2_0", extra_metadata=False)
    config, _ = load_gguf(out)
    assert config["hidden_act"] == act


def test_export_help_names_which_runtime_runs_which_file(capsys):
    from bitnet_torch.cli import main

    with pytest.raises(SystemExit):
        main(["export", "gguf", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in ("--allow-activation-mismatch", "--overwrite", "bitnet-b1.58", "llama.cpp", "bitnet.cpp", "relu2",
                 "silu", "BitNetGGUFReader"):
        assert text in out, text


def test_an_untied_head_is_refused_unless_asked_and_a_duplicated_tied_head_is_written_once(ckpt, tmp_path):
    """No runtime computes an untied lm_head from a BitNet GGUF (measured: the bitnet arch refuses output.weight,
    bitnet.cpp's bitnet-b1.58 runs token_embd as the head)."""
    untied = make_tiny_checkpoint(tmp_path / "untied", form="packed", tie_word_embeddings=False)
    with pytest.raises(GGUFExportError, match="untied lm_head.*--allow-untied-head"):
        export_gguf(untied, tmp_path / "u.gguf", "i2_s")
    report = export_gguf(untied, tmp_path / "u.gguf", "i2_s", allow_untied_head=True)
    assert report.runtimes == () and any("output.weight" in note for note in report.notes)
    assert "lm_head.weight" in load_gguf(tmp_path / "u.gguf")[1]
    doubled = copy_checkpoint(ckpt["relu2"], tmp_path / "doubled")
    state = load_file(str(doubled / "model.safetensors"))
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, str(doubled / "model.safetensors"))
    report = export_gguf(doubled, tmp_path / "d.gguf", "i2_s")
    assert "output.weight" not in {t.name for t in gguf_reader_tensors(tmp_path / "d.gguf")}
    assert report.runtimes == ("bitnet.cpp",)


def gguf_reader_tensors(path):
    from bitnet_torch.formats import BitNetGGUFReader

    return BitNetGGUFReader(path).tensors
