"""A checkpoint's tokenizer read with the `tokenizers` library alone, where that gives what
transformers' tokenizer gives.

Loading a tokenizer through transformers (`AutoTokenizer`) imports most of its model-loading code
(its type validators pull in the weight-conversion tables, and those torch's distributed tensors
and sympy): about two seconds on a 2-core CPU before a token is made. A tokenizer saved by
transformers 5 as the generic class (`TokenizersBackend`, or `PreTrainedTokenizerFast`, its old
name) is its `tokenizer.json` as it stands, plus the special tokens its `tokenizer_config.json`
names. Where that config holds nothing else that transformers would act on, this class reads the
same two files and encodes and decodes as transformers does; anywhere else `lean_tokenizer` says
no and the caller loads transformers' tokenizer. tests/test_lean_tokenizer.py compares the two.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

_CLASSES = {"TokenizersBackend", "PreTrainedTokenizerFast"}
_SPECIAL = ("bos_token", "eos_token", "pad_token", "unk_token")
# Keys of tokenizer_config.json that change nothing in encoding, decoding or the special tokens.
_INERT = {"backend", "tokenizer_class", "model_max_length", "is_local", "local_files_only", "name_or_path",
          "chat_template", "clean_up_tokenization_spaces", "extra_special_tokens", *_SPECIAL}
# transformers rewrites the pre-tokenizer of some vocabularies above this size (Mistral's regex).
_MAX_VOCAB = 100_000


class LeanTokenizer:
    """The parts of transformers' tokenizer the scoring probes use."""

    def __init__(self, backend, config: dict):
        self._tok = backend
        self.model_max_length = config.get("model_max_length", int(1e30))
        ids = {name: (backend.token_to_id(config[name]) if isinstance(config.get(name), str) else None)
               for name in _SPECIAL}
        self.bos_token_id, self.eos_token_id = ids["bos_token"], ids["eos_token"]
        self.pad_token_id, self.unk_token_id = ids["pad_token"], ids["unk_token"]
        self.added_tokens_decoder = backend.get_added_tokens_decoder()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": self.encode(text, add_special_tokens)}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids) if not isinstance(ids, int) else [ids],
                                skip_special_tokens=skip_special_tokens)

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)


def lean_tokenizer(directory: str | os.PathLike) -> LeanTokenizer | None:
    """The tokenizer of a checkpoint directory without transformers, or None where transformers
    might tokenize differently (another class, a setting it acts on, a special token the file does
    not hold as one) or the files are missing or unreadable (transformers then says why)."""
    directory = Path(directory)
    try:
        config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
        if not isinstance(config, dict) or not (directory / "tokenizer.json").is_file():
            return None
        if config.get("tokenizer_class") not in _CLASSES or set(config) - _INERT:
            return None
        if config.get("backend", "tokenizers") != "tokenizers" or config.get("clean_up_tokenization_spaces"):
            return None
        if config.get("extra_special_tokens") or any(config.get(k) is not None and not isinstance(config[k], str)
                                                     for k in _SPECIAL):
            return None
        from tokenizers import Tokenizer

        backend = Tokenizer.from_file(str(directory / "tokenizer.json"))
    except Exception:  # OSError, a JSON error, or what tokenizers raises for a file it cannot read
        return None
    if backend.get_vocab_size(with_added_tokens=True) > _MAX_VOCAB or backend.post_processor is None:
        return None
    if backend.truncation is not None or backend.padding is not None:
        return None
    special = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
    if any(isinstance(config.get(k), str) and config[k] not in special for k in _SPECIAL):
        return None  # transformers would add it as a new special token
    return LeanTokenizer(backend, config)
