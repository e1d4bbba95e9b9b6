"""The packed checkpoint layout (SPEC §3): worked example, round trips, Transformers parity, bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bitnet_torch
from spec_reference import ref_pack, ref_unpack


def test_spec_worked_example():
    w_t = torch.tensor([-1, 0, 1, -1, 0, 1, -1, 1], dtype=torch.int8).reshape(8, 1)
    packed = bitnet_torch.pack_ternary(w_t)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 1)
    assert packed[:, 0].tolist() == [24, 161]
    assert torch.equal(bitnet_torch.unpack_ternary(packed), w_t)


@settings(max_examples=60, deadline=None)
@given(p=st.integers(1, 12), k=st.integers(1, 40), dtype=st.sampled_from([torch.int8, torch.int16, torch.int32, torch.int64]))
def test_pack_matches_spec_and_round_trips(p, k, dtype):
    w_t = torch.randint(-1, 2, (4 * p, k), dtype=dtype)
    packed = bitnet_torch.pack_ternary(w_t)
    assert torch.equal(packed, ref_pack(w_t))
    unpacked = bitnet_torch.unpack_ternary(packed)
    assert unpacked.dtype == torch.int8
    assert torch.equal(unpacked, w_t.to(torch.int8))
    assert torch.equal(unpacked, ref_unpack(packed))


def test_pack_never_mutates_input():
    w_t = torch.randint(-1, 2, (8, 5), dtype=torch.int8)
    before = w_t.clone()
    bitnet_torch.pack_ternary(w_t)
    assert torch.equal(w_t, before)


def test_pack_accepts_non_contiguous_input():
    w_t = torch.randint(-1, 2, (6, 8), dtype=torch.int8).t()  # [8, 6], non-contiguous
    assert not w_t.is_contiguous()
    assert torch.equal(bitnet_torch.pack_ternary(w_t), ref_pack(w_t.contiguous()))


def test_pack_identical_to_transformers_pack_weights():
    from transformers.integrations.bitnet import pack_weights, unpack_weights

    w_t = torch.randint(-1, 2, (64, 33), dtype=torch.int8)
    theirs = pack_weights(w_t.clone())  # pack_weights adds 1 to its argument in place (SPEC §3 trap)
    assert torch.equal(bitnet_torch.pack_ternary(w_t), theirs)
    eager_unpack = getattr(unpack_weights, "_torchdynamo_orig_callable", unpack_weights)
    assert torch.equal(bitnet_torch.unpack_ternary(theirs), eager_unpack(theirs, dtype=torch.int8))


@pytest.mark.parametrize(
    "bad, error, match",
    [
        (torch.zeros(6, 4, dtype=torch.int8), ValueError, "multiple of 4"),
        (torch.full((4, 4), 2, dtype=torch.int8), ValueError, r"\{-1, 0, 1\}"),
        (torch.full((4, 4), -2, dtype=torch.int8), ValueError, r"\{-1, 0, 1\}"),
        (torch.zeros(4, 4), TypeError, "integer"),
        (torch.zeros(4, 4, dtype=torch.bool), TypeError, "integer"),
        (torch.zeros(4, dtype=torch.int8), ValueError, "2-D"),
        (torch.zeros(4, 4, 4, dtype=torch.int8), ValueError, "2-D"),
    ],
)
def test_pack_rejects_bad_input(bad, error, match):
    with pytest.raises(error, match=match):
        bitnet_torch.pack_ternary(bad)


def test_unpack_rejects_bad_input():
    with pytest.raises(TypeError, match="uint8"):
        bitnet_torch.unpack_ternary(torch.zeros(2, 2, dtype=torch.int8))
    with pytest.raises(ValueError, match="2-D"):
        bitnet_torch.unpack_ternary(torch.zeros(2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="corrupt"):
        bitnet_torch.unpack_ternary(torch.full((2, 2), 0b11, dtype=torch.uint8))
