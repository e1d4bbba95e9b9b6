"""The tokenizer a GGUF embeds, rebuilt as a Transformers tokenizer: same ids and text as the original, so that
``generate`` on a ``.gguf`` needs no --tokenizer (issue 15, item 17)."""

from __future__ import annotations

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from bitnet_torch.cli import main
from bitnet_torch.export import export_gguf
from bitnet_torch.formats import GGUFError
from bitnet_torch.formats.gguf_tokenizer import PRE_TOKENIZER_REGEXES, tokenizer_from_gguf
from test_gguf_helpers import CHAT_TEMPLATE, CORPUS, SPECIAL_TOKENS, make_tiny_checkpoint, rewrite_gguf

TEXTS = [
    "And God said, Let there be light: and there was light.",
    "  leading spaces\n\n\nnewlines\ttabs   trailing  ",
    "héllo wörld ünïcode 漢字 🙂 ̃combining",
    "<|begin_of_text|>User: hi<|eot_id|>Assistant: ok<|end_of_text|>",
    "don't you'll WE'RE 1234567 3.14159 x=y+z;",
    "",
]


def save_llama3_style_tokenizer(model_dir):
    """A byte-level BPE with Llama 3's Split regex pre-tokenizer and a BOS-adding post-processor."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRE_TOKENIZER_REGEXES["llama-bpe"]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
        special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))],
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                   add_bos_token=True)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(model_dir)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    gpt2 = make_tiny_checkpoint(root / "gpt2", form="packed")
    llama3 = make_tiny_checkpoint(root / "llama3", form="packed")
    save_llama3_style_tokenizer(llama3)
    files = {}
    for name, model_dir in (("gpt2", gpt2), ("llama3", llama3)):
        files[name] = (model_dir, root / f"{name}.gguf")
        export_gguf(model_dir, files[name][1], "tq2_0")
    return files


@pytest.mark.parametrize("style", ["gpt2", "llama3"])
def test_rebuilt_tokenizer_encodes_and_decodes_like_the_original(exported, style):
    model_dir, gguf_file = exported[style]
    original = AutoTokenizer.from_pretrained(model_dir)
    rebuilt = tokenizer_from_gguf(gguf_file)
    for text in TEXTS:
        ids = original(text)["input_ids"]
        assert rebuilt(text)["input_ids"] == ids, text
        assert rebuilt.decode(ids) == original.decode(ids)
        assert rebuilt.decode(ids, skip_special_tokens=True) == original.decode(ids, skip_special_tokens=True)
    if style == "llama3":
        assert rebuilt("x")["input_ids"][0] == original.bos_token_id  # add_bos_token travels
    assert (rebuilt.bos_token, rebuilt.eos_token) == (original.bos_token, original.eos_token)
    messages = [{"role": "user", "content": "hello"}]
    assert rebuilt.apply_chat_template(messages, add_generation_prompt=True) == original.apply_chat_template(
        messages, add_generation_prompt=True)


def test_generate_on_a_gguf_needs_no_tokenizer_option(exported, capsys):
    model_dir, gguf_file = exported["gpt2"]
    args = ["--prompt", "And the earth", "--max-new-tokens", "6", "--no-int8-lm-head", "--temperature", "0"]
    assert main(["generate", str(model_dir), *args]) == 0
    from_dir = capsys.readouterr().out
    assert main(["generate", str(gguf_file), *args]) == 0
    from_gguf = capsys.readouterr().out
    assert from_gguf == from_dir and from_gguf.startswith("And the earth")


def test_a_gguf_without_a_tokenizer_says_to_pass_one(exported, tmp_path, capsys):
    _, gguf_file = exported["gpt2"]
    bare = rewrite_gguf(gguf_file, tmp_path / "bare.gguf",
                        drop_fields=("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                                     "tokenizer.ggml.merges"))
    with pytest.raises(GGUFError, match="embeds no tokenizer: pass --tokenizer"):
        tokenizer_from_gguf(bare)
    assert main(["generate", str(bare), "--prompt", "x", "--max-new-tokens", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--tokenizer" in err and err.count("\n") == 1
