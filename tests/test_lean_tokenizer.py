"""The `tokenizers`-only tokenizer (surgeon/probes/lean_tokenizer.py) encodes and decodes as
transformers' does, and says no wherever transformers might not."""

import json

import pytest

from tiny_models import save_char_tokenizer

from surgeon.probes.lean_tokenizer import lean_tokenizer
from surgeon.probes.scoring import (
    bos_marker,
    encode,
    encode_like_lm_eval,
    encode_request,
    load_tokenizer,
    prefix_token_id,
)

TEXTS = ["", " ", "hello world", "  two  spaces ", "Question: what is 12+30?\nAnswer: 42", "naïve café ünïcode 東京",
         "<bos>starts with bos", "ends with eos<eos>", "tab\tand\nnewline", "<|im_start|>x"]


def _bpe(path, *, post_bos: bool, extra_config: dict | None = None):
    """A byte-level BPE trained here, saved by transformers; with `post_bos` its post-processor puts
    the bos token first (as Llama-3's tokenizer.json does)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [t for t in TEXTS if t] * 20 + ["the quick brown fox jumps over the lazy dog"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<bos>", "<eos>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if post_bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                           special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")
    fast.save_pretrained(path)
    if extra_config:
        cfg = json.loads((path / "tokenizer_config.json").read_text())
        (path / "tokenizer_config.json").write_text(json.dumps({**cfg, **extra_config}))
    return path


@pytest.mark.parametrize("kind", ["chars", "bpe", "bpe with bos"])
def test_encodes_and_decodes_as_transformers_does(tmp_path, kind):
    if kind == "chars":
        save_char_tokenizer(tmp_path)
    else:
        _bpe(tmp_path, post_bos=kind == "bpe with bos")
    lean, full = lean_tokenizer(tmp_path), load_tokenizer(tmp_path)
    assert lean is not None
    for text in TEXTS:
        for special in (True, False):
            assert lean.encode(text, add_special_tokens=special) == full.encode(text, add_special_tokens=special)
        assert encode(lean, text) == encode(full, text)
        ids = full.encode(text)
        assert lean.decode(ids) == full.decode(ids)
        seen: dict = {}  # a context's tokens kept for its next request, as loglikelihoods keeps them
        for cont in (" 42", "x"):
            if text.strip():
                assert encode_request(lean, text, cont, 64) == encode_request(full, text, cont, 64)
                tight = len(encode_request(full, text, cont, 64)[1]) + 1  # keeps 2 context tokens
                for limit in (64, tight):  # left-truncated after the kept tokens are looked up
                    kept = encode_request(full, text, cont, limit, contexts=seen)
                    assert kept == encode_request(full, text, cont, limit)
        assert bool(seen) == bool(text.strip())
        assert all(seen[t] == encode_like_lm_eval(full, t, bos_marker(full)) for t in seen)
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "model_max_length"):
        assert getattr(lean, attr) == getattr(full, attr), attr
    assert prefix_token_id(lean) == prefix_token_id(full) and bos_marker(lean) == bos_marker(full)
    assert lean.get_vocab() == full.get_vocab()
    if kind == "bpe with bos":
        assert lean.encode("hello")[0] == lean.bos_token_id  # the post-processor did run


@pytest.mark.parametrize("change", [
    {"add_bos_token": True},  # transformers rewrites the post-processor
    {"tokenizer_class": "LlamaTokenizer"},  # a class that rebuilds its pipeline from the vocabulary
    {"bos_token": "<s>"},  # not a special token of the file: transformers would add it
    {"split_special_tokens": True},
    {"clean_up_tokenization_spaces": True},
    {"extra_special_tokens": ["<tool>"]},
])
def test_a_setting_transformers_acts_on_sends_the_caller_to_transformers(tmp_path, change):
    _bpe(tmp_path, post_bos=False, extra_config=change)
    assert lean_tokenizer(tmp_path) is None
    assert load_tokenizer(tmp_path, lean=True).__class__.__name__ != "LeanTokenizer"


def test_missing_or_broken_files_are_left_to_transformers_to_report(tmp_path):
    assert lean_tokenizer(tmp_path) is None  # nothing there
    _bpe(tmp_path, post_bos=False)
    (tmp_path / "tokenizer.json").write_text("{not json")
    assert lean_tokenizer(tmp_path) is None
