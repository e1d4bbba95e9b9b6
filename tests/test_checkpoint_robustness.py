"""Broken checkpoints give one clear ``BitNetCheckpointError``; saves are all or nothing (issue 15, items 4, 5, 7, 10).

Corrupt headers, absurd or inconsistent configs, shard indexes that point elsewhere and corrupt packed
values are built by hand on tiny real checkpoints. Interrupted saves are real: a failing tensor write (a meta
tensor cannot be serialised; a disk that fills up), and a subprocess SIGKILLed in the middle of writing its
weights.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import transformers.modeling_utils
from safetensors.torch import load_file, save_file

from bitnet_torch.cli import main as cli_main
from bitnet_torch.models import BitNetCheckpointError, BitNetConfig, BitNetForCausalLM
from test_model import tiny_config

IDS = torch.tensor([[1, 17, 42, 99, 3]])
LAYER = "model.layers.1.mlp.gate_proj"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("robust")
    torch.manual_seed(5)
    model = BitNetForCausalLM(tiny_config()).eval()
    paths = {"master": str(root / "master"), "packed": str(root / "packed")}
    model.save_pretrained(paths["master"], packed=False)
    model.save_pretrained(paths["packed"], packed=True)
    return paths


def _copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def _edit_config(path: str, **changes) -> None:
    config_path = os.path.join(path, "config.json")
    config = json.load(open(config_path))
    config.update(changes)
    json.dump(config, open(config_path, "w"))


def _write_header(path: str, header) -> None:
    """Replace the safetensors header of ``path`` (keeping its data bytes) by the JSON ``header``."""
    data = open(path, "rb").read()
    (old_len,) = struct.unpack("<Q", data[:8])
    body = json.dumps(header).encode()
    open(path, "wb").write(struct.pack("<Q", len(body)) + body + data[8 + old_len:])


def _header(path: str) -> dict:
    data = open(path, "rb").read()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length])


def _files(path) -> dict[str, bytes]:
    return {name: open(os.path.join(path, name), "rb").read() for name in sorted(os.listdir(path))}


# --- raw errors that must be clear ones (item 10) --------------------------------------------------------


def test_header_that_is_a_json_list_is_refused(saved, tmp_path):
    path = _copy(saved["packed"], tmp_path / "list")
    _write_header(os.path.join(path, "model.safetensors"), [1, 2, 3])
    with pytest.raises(BitNetCheckpointError, match="header is a JSON list"):
        BitNetForCausalLM.from_pretrained(path)


@pytest.mark.parametrize("damage", ["no_data_offsets", "offsets_not_a_pair", "offsets_wrong_size", "bad_dtype", "bad_shape"])
def test_corrupt_header_entries_are_refused(saved, tmp_path, damage):
    path = _copy(saved["packed"], tmp_path / damage)
    weights = os.path.join(path, "model.safetensors")
    header = _header(weights)
    entry = header[f"{LAYER}.weight"]
    if damage == "no_data_offsets":
        del entry["data_offsets"]
    elif damage == "offsets_not_a_pair":
        entry["data_offsets"] = "0-10"
    elif damage == "offsets_wrong_size":
        entry["data_offsets"] = [entry["data_offsets"][0], entry["data_offsets"][1] - 8]
    elif damage == "bad_dtype":
        entry["dtype"] = "U3"
    else:
        entry["shape"] = [32, -64]
    _write_header(weights, header)
    with pytest.raises(BitNetCheckpointError, match=f"corrupt header: '{LAYER}.weight'"):
        BitNetForCausalLM.from_pretrained(path)


@pytest.mark.parametrize("changes, message", [
    ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer, got 0"),
    ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
    ({"num_attention_heads": 3, "num_key_value_heads": 3}, "hidden_size \\(64\\) must be a multiple of num_attention_heads"),
    ({"hidden_size": -64}, "hidden_size must be a positive integer"),
    ({"intermediate_size": 0}, "intermediate_size must be a positive integer"),
])
def test_impossible_config_sizes_are_refused(saved, tmp_path, changes, message):
    path = _copy(saved["packed"], tmp_path / "cfg")
    _edit_config(path, **changes)
    with pytest.raises(BitNetCheckpointError, match=message):
        BitNetForCausalLM.from_pretrained(path)
    with pytest.raises(ValueError, match=message):
        BitNetConfig(**{**tiny_config().to_dict(), **changes})


@pytest.mark.parametrize("outside", ["../elsewhere.safetensors", "/ABS/elsewhere.safetensors", "sub/../../elsewhere.safetensors"])
def test_shard_index_pointing_outside_the_checkpoint_is_refused(saved, tmp_path, outside):
    # A perfectly valid shard lies outside the checkpoint folder: an index naming it must still be refused.
    path = tmp_path / "ckpt"
    path.mkdir()
    shutil.copy(os.path.join(saved["packed"], "config.json"), path)
    shutil.copy(os.path.join(saved["packed"], "model.safetensors"), tmp_path / "elsewhere.safetensors")
    target = outside.replace("/ABS", str(tmp_path)) if outside.startswith("/ABS") else outside
    keys = load_file(tmp_path / "elsewhere.safetensors").keys()
    json.dump({"metadata": {}, "weight_map": {k: target for k in keys}}, open(path / "model.safetensors.index.json", "w"))
    with pytest.raises(BitNetCheckpointError, match="outside the checkpoint directory"):
        BitNetForCausalLM.from_pretrained(path)


def test_shard_index_naming_a_missing_shard_is_refused(saved, tmp_path):
    path = _copy(saved["packed"], tmp_path / "idx")
    keys = load_file(os.path.join(path, "model.safetensors")).keys()
    json.dump({"weight_map": {k: "model-00001-of-00002.safetensors" for k in keys}},
              open(os.path.join(path, "model.safetensors.index.json"), "w"))
    with pytest.raises(BitNetCheckpointError, match="names the shard model-00001-of-00002.safetensors, which does not exist"):
        BitNetForCausalLM.from_pretrained(path)


# --- absurd sizes refused before anything of that size is built (item 7) ---------------------------------


@pytest.mark.parametrize("changes, message", [
    ({"num_hidden_layers": 1_000_000}, "num_hidden_layers=1000000 but the checkpoint holds tensors for 2"),
    ({"num_hidden_layers": 30_000_000}, "num_hidden_layers=30000000"),
    ({"hidden_size": 1_048_576, "num_attention_heads": 4}, "embed_tokens.weight is F32 \\(256, 64\\)"),
    ({"vocab_size": 2**31}, "embed_tokens.weight is F32 \\(256, 64\\)"),
    ({"intermediate_size": 10**9}, "gate_proj.weight is U8 \\(32, 64\\)"),
])
def test_absurd_config_sizes_are_refused_quickly(saved, tmp_path, changes, message):
    path = _copy(saved["packed"], tmp_path / "absurd")
    _edit_config(path, **changes)
    start = time.perf_counter()
    with pytest.raises(BitNetCheckpointError, match=message):
        BitNetForCausalLM.from_pretrained(path)
    assert time.perf_counter() - start < 5.0, "an absurd config must be refused from the file headers, at once"


def test_config_with_fewer_layers_than_the_checkpoint_loads_the_first_ones(saved):
    # Transformers' way of loading a truncated model: the extra layers are reported as unexpected.
    model, info = BitNetForCausalLM.from_pretrained(saved["packed"], num_hidden_layers=1, output_loading_info=True)
    assert len(model.model.layers) == 1
    assert info["unexpected_keys"] and all(k.startswith("model.layers.1.") for k in info["unexpected_keys"])


# --- corrupt packed values (item 5) -----------------------------------------------------------------------


def test_packed_bytes_with_code_3_are_refused_naming_the_tensor(saved, tmp_path):
    path = _copy(saved["packed"], tmp_path / "code3")
    weights = os.path.join(path, "model.safetensors")
    tensors = load_file(weights)
    codes = tensors[f"{LAYER}.weight"].clone()
    codes[5, 17] = (codes[5, 17] & 0b11110011) | 0b00001100  # one field of one byte becomes 3
    tensors[f"{LAYER}.weight"] = codes
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(BitNetCheckpointError, match=f"{LAYER}.weight holds the 2-bit code 3"):
        BitNetForCausalLM.from_pretrained(path)
    with pytest.raises(BitNetCheckpointError, match=f"{LAYER}.weight holds the 2-bit code 3"):
        BitNetForCausalLM.from_pretrained(None, config=BitNetConfig.from_pretrained(path), state_dict=tensors)


@pytest.mark.parametrize("value", [float("nan"), 0.0, -0.5, float("inf")])
def test_packed_weight_scale_that_is_not_positive_and_finite_is_refused(saved, tmp_path, value):
    path = _copy(saved["packed"], tmp_path / "scale")
    weights = os.path.join(path, "model.safetensors")
    tensors = load_file(weights)
    tensors[f"{LAYER}.weight_scale"] = torch.tensor([value])
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(BitNetCheckpointError, match=f"{LAYER}.weight_scale is {value}"):
        BitNetForCausalLM.from_pretrained(path)


def test_code_3_detection_covers_every_field_and_odd_layouts():
    from bitnet_torch.models.checkpoint import _packed_bytes_hold_code_3

    for shape in ((8, 8), (3, 5), (1, 1), (16, 24)):
        valid = torch.randint(0, 3, (4,) + shape, dtype=torch.uint8)
        packed = valid[0] | (valid[1] << 2) | (valid[2] << 4) | (valid[3] << 6)
        assert not _packed_bytes_hold_code_3(packed), shape
        assert not _packed_bytes_hold_code_3(packed[:, 1:]), shape  # non-contiguous, unaligned view
        for field in range(4):
            broken = packed.clone()
            broken.view(-1)[-1] |= 3 << (2 * field)
            assert _packed_bytes_hold_code_3(broken), (shape, field)


# --- all-or-nothing saves (item 4) ------------------------------------------------------------------------


def _visible_entries(parent) -> list[str]:
    return sorted(name for name in os.listdir(parent) if not name.startswith("."))


def _assert_no_leftovers(parent) -> None:
    assert not [name for name in os.listdir(parent) if ".partial-" in name], os.listdir(parent)


@pytest.mark.parametrize("packed", [False, True])
def test_a_save_that_fails_midway_leaves_the_old_checkpoint_untouched(saved, tmp_path, packed):
    target = _copy(saved["master"], tmp_path / "ckpt")
    (tmp_path / "ckpt" / "tokenizer.json").write_text("{}")
    before = _files(target)
    model = BitNetForCausalLM.from_pretrained(saved["master"])
    state_dict = model.state_dict()
    state_dict[f"{LAYER}.weight"] = torch.empty(128, 64, device="meta")  # cannot be written: fails mid-save
    with pytest.raises(Exception):
        model.save_pretrained(target, packed=packed, state_dict=state_dict)
    assert _files(target) == before, "a failed save must not change the existing checkpoint"
    _assert_no_leftovers(tmp_path)
    with pytest.raises(Exception):
        model.save_pretrained(tmp_path / "fresh", packed=packed, state_dict=state_dict)
    assert _visible_entries(tmp_path) == ["ckpt"], "a failed save into a new directory must create nothing"
    _assert_no_leftovers(tmp_path)


def test_a_disk_full_during_the_weight_write_leaves_nothing_half_written(saved, tmp_path, monkeypatch):
    target = _copy(saved["packed"], tmp_path / "ckpt")
    before = _files(target)
    real_save = transformers.modeling_utils.safe_save_file

    def disk_fills_up(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as handle:  # what a full disk leaves: a truncated file
            handle.truncate(os.path.getsize(filename) // 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", disk_fills_up)
    model = BitNetForCausalLM.from_pretrained(saved["master"])
    with pytest.raises(OSError, match="No space left"):
        model.save_pretrained(target, packed=True)
    assert _files(target) == before
    _assert_no_leftovers(tmp_path)


def test_saving_into_an_existing_directory_replaces_weights_and_keeps_other_files(saved, tmp_path):
    target = tmp_path / "ckpt"
    model = BitNetForCausalLM.from_pretrained(saved["master"])
    model.save_pretrained(target, max_shard_size="40KB")
    assert (target / "model.safetensors.index.json").exists()
    (target / "tokenizer.json").write_text('{"kept": true}')
    (target / "checkpoint-10").mkdir()
    (target / "checkpoint-10" / "trainer_state.json").write_text("{}")
    model.save_pretrained(target, packed=True)
    names = set(os.listdir(target))
    assert {"config.json", "model.safetensors", "tokenizer.json", "checkpoint-10"} <= names
    assert not any(n.startswith("model-0") or n.endswith("index.json") for n in names), "stale shards must go"
    assert (target / "tokenizer.json").read_text() == '{"kept": true}'
    assert (target / "checkpoint-10" / "trainer_state.json").read_text() == "{}"
    assert BitNetForCausalLM.from_pretrained(target).is_packed
    _assert_no_leftovers(tmp_path)


def test_save_pretrained_into_a_file_is_refused(saved, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        BitNetForCausalLM.from_pretrained(saved["packed"]).save_pretrained(tmp_path / "file")
    assert (tmp_path / "file").read_text() == "x"


_KILLED_SAVE = textwrap.dedent(
    """
    import sys, time
    import transformers.modeling_utils as mu
    from bitnet_torch.models import BitNetForCausalLM

    real_save = mu.safe_save_file

    def write_then_hang(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        print("WRITTEN", flush=True)
        time.sleep(120)  # killed here: config and weights are on disk, the save is not finished

    mu.safe_save_file = write_then_hang
    model = BitNetForCausalLM.from_pretrained(sys.argv[1])
    model.save_pretrained(sys.argv[2], packed=sys.argv[3] == "packed")
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("existing", [True, False])
def test_a_save_killed_midway_leaves_the_old_checkpoint_loadable(saved, tmp_path, existing):
    target = tmp_path / "ckpt"
    if existing:
        _copy(saved["packed"], target)
    before = _files(target) if existing else None
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout's bitnet_torch
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    process = subprocess.Popen([sys.executable, "-c", _KILLED_SAVE, saved["master"], str(target), "master"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        line = process.stdout.readline()
        assert line.strip() == "WRITTEN", f"the save never reached its weight write: {line!r}"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    if existing:
        assert _files(target) == before, "a killed save changed the existing checkpoint"
        assert BitNetForCausalLM.from_pretrained(target).is_packed
    assert _visible_entries(tmp_path) == (["ckpt"] if existing else []), "a killed save must leave no visible checkpoint"
    leftovers = [n for n in os.listdir(tmp_path) if ".partial-" in n]
    assert leftovers and all(n.startswith(".") for n in leftovers)  # hidden, and ...
    BitNetForCausalLM.from_pretrained(saved["master"]).save_pretrained(target, packed=False)
    _assert_no_leftovers(tmp_path)  # ... removed by the next save to that target (its writer is dead)
    assert not BitNetForCausalLM.from_pretrained(target).is_packed


def test_convert_is_all_or_nothing(saved, tmp_path, capsys):
    # A source whose tokenizer cannot be read: the conversion fails after the weights were written.
    src = _copy(saved["master"], tmp_path / "src")
    (tmp_path / "src" / "tokenizer.json").write_text("{ not json")
    (tmp_path / "src" / "tokenizer_config.json").write_text("{}")
    torch.manual_seed(77)  # an older checkpoint of another model, so that an overwrite would show
    BitNetForCausalLM(tiny_config()).save_pretrained(tmp_path / "out", packed=True, max_shard_size="40KB")
    out = str(tmp_path / "out")
    (tmp_path / "out" / "README.md").write_text("mine")
    before = _files(out)
    assert cli_main(["convert", src, out, "--to", "packed", "--overwrite"]) != 0
    assert _files(out) == before
    _assert_no_leftovers(tmp_path)
    os.remove(tmp_path / "src" / "tokenizer.json")
    os.remove(tmp_path / "src" / "tokenizer_config.json")
    assert cli_main(["convert", src, out, "--to", "packed", "--overwrite"]) == 0
    assert (tmp_path / "out" / "README.md").read_text() == "mine"
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists(), "the old shards must not survive"
    converted, expected = BitNetForCausalLM.from_pretrained(out), BitNetForCausalLM.from_pretrained(src, packed=True)
    for key, value in expected.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key
    _assert_no_leftovers(tmp_path)
