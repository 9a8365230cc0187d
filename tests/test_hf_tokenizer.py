"""Hugging Face tokenizers in megadeep's data path: the ids are transformers' own (special tokens included),
packing ends each document with exactly one eos, and a tokenizer without eos is refused in one line."""
import json

import pytest

from megadeep.data.tokenizer import HFTokenizer, Tokenizer, open_tokenizer, train_hf_bpe
from megadeep.errors import DataError

TEXTS = ["To be, or not to be, that is the question:\n\nWhether 'tis nobler in the mind to suffer\n",
         "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles"] * 20


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return train_hf_bpe(TEXTS, tmp_path_factory.mktemp("tok"), 300)


def with_post_processor(src, dst, template: str | None):
    """A copy of ``src`` whose post-processor is ``template`` (None: none, as Qwen2's)."""
    dst.mkdir()
    tok = json.loads((src / "tokenizer.json").read_text())
    if template is None:
        tok["post_processor"] = None
    else:
        from tokenizers import Tokenizer as Rust
        from tokenizers import processors

        rust = Rust.from_file(str(src / "tokenizer.json"))
        specials = [(t, rust.token_to_id(t)) for t in ("<|begin_of_text|>", "<|end_of_text|>")]
        rust.post_processor = processors.TemplateProcessing(single=template, special_tokens=specials)
        tok = json.loads(rust.to_str())
    (dst / "tokenizer.json").write_text(json.dumps(tok))
    (dst / "tokenizer_config.json").write_text((src / "tokenizer_config.json").read_text())
    return dst


@pytest.mark.parametrize("style", ["llama3-bos", "qwen-none", "bos-and-eos"])
def test_ids_are_transformers_ids_with_one_eos(style, folder, tmp_path):
    from transformers import AutoTokenizer

    template = {"llama3-bos": "<|begin_of_text|> $A", "qwen-none": None,
                "bos-and-eos": "<|begin_of_text|> $A <|end_of_text|>"}[style]
    path = with_post_processor(folder, tmp_path / style, template)
    ours, theirs = open_tokenizer(path), AutoTokenizer.from_pretrained(path)
    assert isinstance(ours, HFTokenizer) and ours.vocab_size == len(theirs)
    assert ours.eos_id == theirs.eos_token_id and ours.identity()["bos_id"] == theirs.bos_token_id
    for text in TEXTS[:2]:
        expected = theirs(text)["input_ids"]
        if expected[-1] == theirs.eos_token_id:  # the post-processor's eos: packing adds it, once
            expected = expected[:-1]
        assert list(ours.encode(text)) == expected
        assert (expected[0] == theirs.bos_token_id) == (style != "qwen-none")


def test_folder_or_file_and_sentencepiece_still_recognised(folder, tmp_path):
    from megadeep.data.tokenizer import TokenizerSettings, train_tokenizer

    assert isinstance(open_tokenizer(folder / "tokenizer.json"), HFTokenizer)
    train_tokenizer(TEXTS, tmp_path / "sp", TokenizerSettings(vocab_size=320), threads=1)
    assert isinstance(open_tokenizer(tmp_path / "sp"), Tokenizer)  # its tokenizer.json is megadeep's info file


def test_tokenizer_without_eos_is_refused(folder, tmp_path):
    path = with_post_processor(folder, tmp_path / "noeos", "$A")
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>"}))
    with pytest.raises(DataError, match="no eos token"):
        open_tokenizer(path)
