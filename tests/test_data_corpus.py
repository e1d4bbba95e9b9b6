"""The embedded KJV corpus, its deterministic split, the BPE tokenizer, block packing and the unigram baseline."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoTokenizer

from bitnet_torch.data import (
    EOT_TOKEN,
    load_kjv_chapters,
    load_text_splits,
    pack_documents,
    pack_token_stream,
    split_every_nth,
    tokenize_documents,
    train_bpe_tokenizer,
    unigram_perplexity,
)


@pytest.fixture(scope="module")
def kjv_splits():
    return load_text_splits()


@pytest.fixture(scope="module")
def small_tokenizer(kjv_splits):
    return train_bpe_tokenizer(kjv_splits.train[:200], vocab_size=512)


def test_kjv_has_every_chapter_without_verse_numbers():
    chapters = load_kjv_chapters()
    assert len(chapters) == 1189, "the KJV has 1189 chapters"
    assert chapters[0].book == "Genesis" and chapters[0].text.startswith("In the beginning God created")
    assert chapters[-1].book == "Revelation" and chapters[-1].chapter == 22
    assert not any(ch.isdigit() and ":" in c.text[:6] for c in chapters for ch in c.text[:1]), "verse references left in"
    assert "1:2 " not in chapters[0].text


def test_validation_split_is_deterministic_and_disjoint(kjv_splits):
    again = load_text_splits()
    assert again.validation == kjv_splits.validation
    assert len(kjv_splits.validation) == 59 and len(kjv_splits.train) == 1130
    assert not set(kjv_splits.validation) & set(kjv_splits.train)


def test_split_every_nth_refuses_empty_sides():
    assert split_every_nth(["a", "b", "c", "d"], 2) == (["b", "d"], ["a", "c"])
    with pytest.raises(ValueError, match="non-empty"):
        split_every_nth(["only"], 20)
    with pytest.raises(ValueError, match=">= 2"):
        split_every_nth(["a", "b"], 1)


def test_local_text_files_become_split_documents(tmp_path):
    (tmp_path / "a.txt").write_text("\n\n".join(f"paragraph {i} text" for i in range(30)))
    splits = load_text_splits(str(tmp_path / "a.txt"), validation_every=10)
    assert len(splits.train) == 27 and splits.validation == ["paragraph 0 text", "paragraph 10 text", "paragraph 20 text"]
    with pytest.raises(FileNotFoundError):
        load_text_splits(str(tmp_path / "missing.txt"))


def test_saved_datasets_directory_is_accepted(tmp_path):
    import datasets

    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"text": ["x y"] * 5}), "validation": datasets.Dataset.from_dict({"text": ["z"]})}
    ).save_to_disk(str(tmp_path / "ds"))
    splits = load_text_splits(str(tmp_path / "ds"))
    assert splits.train == ["x y"] * 5 and splits.validation == ["z"]


def test_tokenizer_round_trips_and_has_chat_template(small_tokenizer, tmp_path):
    tok = small_tokenizer
    text = "And God said, Let there be light: and there was light."
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text
    assert len(tok) == 512 and tok.pad_token_id != tok.eos_token_id
    prompt = tok.apply_chat_template([{"role": "user", "content": "How are you?"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|begin_of_text|>User: How are you?<|eot_id|>Assistant: "
    tok.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(text, add_special_tokens=False).input_ids == ids
    assert reloaded.convert_tokens_to_ids(EOT_TOKEN) == tok.convert_tokens_to_ids(EOT_TOKEN)
    assert reloaded.chat_template == tok.chat_template
    with pytest.raises(ValueError, match="at least"):
        train_bpe_tokenizer(["abc"], vocab_size=100)


def test_packing_separates_documents_with_eos_and_drops_the_tail(small_tokenizer):
    stream = tokenize_documents(small_tokenizer, ["In the beginning", "God"])
    eos = small_tokenizer.eos_token_id
    assert int((stream == eos).sum()) == 2 and int(stream[-1]) == eos
    blocks = pack_token_stream(torch.arange(10), block_size=4)
    assert len(blocks) == 2 and blocks[1]["input_ids"].tolist() == [4, 5, 6, 7]
    assert torch.equal(blocks[:]["input_ids"], blocks[:]["labels"])
    with pytest.raises(ValueError, match="not enough"):
        pack_token_stream(torch.arange(3), block_size=4)
    packed = pack_documents(small_tokenizer, ["In the beginning God created the heaven"] * 10, block_size=8)
    assert packed[0]["input_ids"].shape == (8,)


def test_unigram_perplexity_matches_hand_computation():
    train = torch.tensor([0, 0, 0, 1])  # counts +1: [4, 2, 1] over N + V = 7
    targets = torch.tensor([0, 1, 2])
    expected = math.exp(-(math.log(4 / 7) + math.log(2 / 7) + math.log(1 / 7)) / 3)
    assert unigram_perplexity(train, targets, vocab_size=3) == pytest.approx(expected)
    with pytest.raises(ValueError, match="outside"):
        unigram_perplexity(train, torch.tensor([3]), vocab_size=3)


def test_kjv_unigram_baseline_is_in_the_expected_range(kjv_splits, small_tokenizer):
    stream = tokenize_documents(small_tokenizer, kjv_splits.train[:200])
    val = pack_documents(small_tokenizer, kjv_splits.validation[:10], block_size=64)[:]["input_ids"]
    ppl = unigram_perplexity(stream, val[:, 1:], vocab_size=len(small_tokenizer))
    assert 50 < ppl < 400, ppl
