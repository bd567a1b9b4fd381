"""The model's tokenizer (GPT-2 byte-level BPE, or any ``tokenizers`` pipeline such as Llama's),
read from a model directory.

Sources, in order: ``tokenizer.json`` (a serialized ``tokenizers`` pipeline), or ``vocab.json`` +
``merges.txt`` (the original GPT-2 files). The raw files are kept so that export writes exactly
what was read. GPT-2's special tokens are all ``<|endoftext|>``; other tokenizers take their bos
and eos tokens from the model config's ids when given, else ``<|endoftext|>`` when the vocabulary
has it, else none.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Mapping

import tokenizers
from tokenizers import decoders, models, pre_tokenizers

EOS_TOKEN = "<|endoftext|>"
SOURCE_FILES = ("tokenizer.json", "vocab.json", "merges.txt")


@dataclasses.dataclass(frozen=True, eq=False)
class Tokenizer:
    """Text <-> token ids. ``files`` maps file name -> bytes of the tokenizer's source files;
    ``bos_token`` / ``eos_token`` are the special tokens' text as the model's config names them
    (``None``: the model has none; written to ``tokenizer_config.json``).

    ``bos_id``: the start token rome_jax puts before every whole sequence the model reads
    (``encode_sequence``), never before raw pieces (``encode``, e.g. a target continuation);
    None (the default): nothing is prepended. Set it with ``with_bos``.
    """

    backend: tokenizers.Tokenizer
    files: dict[str, bytes]
    bos_token: str | None = EOS_TOKEN
    eos_token: str | None = EOS_TOKEN
    bos_id: int | None = None

    @property
    def eos_id(self) -> int | None:
        return None if self.eos_token is None else self.backend.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int:
        """Id written at padded (masked) positions: eos, or 0 for a tokenizer without one."""
        return 0 if self.eos_id is None else self.eos_id

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    @property
    def start_ids(self) -> list[int]:
        """What ``encode_sequence`` puts before a text: ``[bos_id]`` or ``[]``."""
        return [] if self.bos_id is None else [self.bos_id]

    def encode_sequence(self, text: str) -> list[int]:
        """A whole sequence the model reads (prompt, corpus text): start_ids + encode(text)."""
        return self.start_ids + self.encode(text)

    def encode_sequences(self, texts: list[str]) -> list[list[int]]:
        return [self.start_ids + ids for ids in self.encode_batch(texts)]

    def token_id(self, token: str) -> int:
        """The id of one token of the vocabulary; ValueError naming it when absent."""
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"token: the tokenizer has no token {token!r}")
        return token_id

    def with_bos(self, token: str | None = EOS_TOKEN) -> "Tokenizer":
        """The same tokenizer with ``token`` as start token (None: none). The default,
        ``<|endoftext|>``, is the document separator GPT-2 and SmolLM2 were pretrained with."""
        if token is None:
            return dataclasses.replace(self, bos_id=None)
        try:
            return dataclasses.replace(self, bos_id=self.token_id(token))
        except ValueError:
            raise ValueError(f"bos: the tokenizer has no token {token!r}; name the model's "
                             "start token") from None

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    @classmethod
    def from_dir(cls, path: str | Path, token_ids: Mapping[str, int] | None = None
                 ) -> "Tokenizer":
        """Read ``path``; ``token_ids`` ({"bos_token_id": .., "eos_token_id": ..} from the model
        config) name the special tokens of a ``tokenizer.json``."""
        path = Path(path)
        if (path / "tokenizer.json").is_file():
            raw = (path / "tokenizer.json").read_bytes()
            try:
                backend = tokenizers.Tokenizer.from_str(raw.decode())
            except Exception as err:  # the tokenizers library raises plain Exception
                raise ValueError(f"{path / 'tokenizer.json'}: cannot read tokenizer ({err})")
            default = EOS_TOKEN if backend.token_to_id(EOS_TOKEN) is not None else None
            special = {name: backend.id_to_token(token_ids[f"{name}_id"])
                       if f"{name}_id" in (token_ids or {}) else default
                       for name in ("bos_token", "eos_token")}
            return cls(backend, {"tokenizer.json": raw}, **special)
        vocab, merges = path / "vocab.json", path / "merges.txt"
        missing = [p.name for p in (vocab, merges) if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{path}: no tokenizer (need tokenizer.json, or vocab.json "
                                    f"and merges.txt; missing {', '.join(missing)})")
        try:
            vocab_map = json.loads(vocab.read_bytes())
            bpe = models.BPE.from_file(str(vocab), str(merges))
        except Exception as err:
            raise ValueError(f"{path}: cannot read vocab.json/merges.txt ({err})")
        backend = tokenizers.Tokenizer(bpe)
        if EOS_TOKEN in vocab_map:  # one token in text, as in transformers and tokenizer.json
            backend.add_special_tokens([tokenizers.AddedToken(EOS_TOKEN, special=True)])
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        return cls(backend, {"vocab.json": vocab.read_bytes(), "merges.txt": merges.read_bytes()})

    def save(self, path: Path, model_max_length: int) -> None:
        """Write the source files and a ``tokenizer_config.json`` for ``transformers``: GPT-2's
        (``GPT2Tokenizer``, every special token ``<|endoftext|>``) when the special tokens are
        GPT-2's, else ``PreTrainedTokenizerFast`` over ``tokenizer.json`` with its own."""
        for name, raw in self.files.items():
            (path / name).write_bytes(raw)
        if self.bos_token == self.eos_token == EOS_TOKEN:
            config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": model_max_length,
                      "bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN,
                      "add_prefix_space": False}
        else:
            config = {"tokenizer_class": "PreTrainedTokenizerFast",
                      "model_max_length": model_max_length, "clean_up_tokenization_spaces": False,
                      "bos_token": self.bos_token, "eos_token": self.eos_token}
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
