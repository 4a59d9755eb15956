"""Tokenizers, shared by data preparation, inference and serving: byte-level BPEs trained here with
Hugging Face `tokenizers` or read from a `tokenizer.json` (for example the one that comes with a DeepSeek
checkpoint), and the byte-level stand-in that preset models use.

Special tokens use DeepSeek-V3's spellings, so a model trained here reads prompts, chats and
end-of-text the way DeepSeek's do. A tokenizer trained here numbers them first:

    0 <｜begin▁of▁sentence｜>  BOS
    1 <｜end▁of▁sentence｜>    EOS, also the separator between packed documents
    2 <｜▁pad▁｜>              padding
    3 <｜User｜>               chat turns
    4 <｜Assistant｜>

`save(dir)` writes `tokenizer.json` and a `tokenizer_config.json` naming BOS/EOS/PAD, the pair that
transformers' `AutoTokenizer.from_pretrained(dir)` reads. The `tokenizer_config.json` a tokenizer was read
with is kept whole in `Tokenizer.config`: its chat template is what `dsv3.chat_template` renders.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from dsv3.errors import Dsv3Error, InvalidValue
from dsv3.hardware import check_memory
from dsv3.utils import atomic_write_text

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
SPECIAL_TOKENS = (BOS, EOS, PAD, USER, ASSISTANT)
# DeepSeek-V3.1's hybrid thinking mode (`dsv3.chat_template`): reasoning opens with THINK and closes with
# THINK_END. They are plain strings here, not SPECIAL_TOKENS: a byte-level BPE spells any text exactly, so
# the reasoning splitter (`dsv3.infer.reasoning`), which reads decoded text, finds them however they were
# tokenized (DeepSeek's own tokenizer.json has each as one added token), and a tokenizer on disk is read
# from its file, never renumbered. Reserving them in `Tokenizer.train` would shift every id of a newly
# trained vocabulary and give the splitter nothing it needs.
THINK = "<think>"
THINK_END = "</think>"

# End-of-text spellings tried, in order, for a tokenizer.json that comes without a tokenizer_config.json.
EOS_SPELLINGS = (EOS, "<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")
BOS_SPELLINGS = (BOS, "<|begin_of_text|>", "<s>", "<bos>")

BPE_BYTES_PER_TOKEN = 96  # what the BPE trainer reserves per vocabulary entry (it tried 70.9 GB for 10^9)
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the names of its BOS, EOS and PAD tokens.

    `encode` never adds special tokens by itself (some tokenizer.json files add BOS in a post-processor;
    that is switched off here): the caller says when it wants BOS, and packing adds EOS between documents.
    """

    def __init__(self, backend: tokenizers.Tokenizer, eos_token: str, bos_token: str | None = None,
                 pad_token: str | None = None, config: dict[str, Any] | None = None):
        self.backend = backend
        self.eos_token, self.bos_token, self.pad_token = eos_token, bos_token, pad_token
        self.eos_id = self._id(eos_token)
        self.bos_id = self._id(bos_token) if bos_token is not None else None
        self.pad_id = self._id(pad_token) if pad_token is not None else None
        # largest id + 1: the embedding rows a model needs to accept every id this tokenizer makes
        self.vocab_size = max(backend.get_vocab(with_added_tokens=True).values()) + 1
        # what save() writes as tokenizer_config.json: the file this tokenizer came with (chat template
        # and all), or the minimum transformers needs
        self.config = config or {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": bos_token,
            "eos_token": eos_token,
            "pad_token": pad_token,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
        }

    def _id(self, token: str) -> int:
        i = self.backend.token_to_id(token)
        if i is None:
            raise Dsv3Error(f"the tokenizer has no token {token!r}; name one it has in tokenizer_config.json")
        return i

    # ----- construction ----------------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 8192, length: int | None = None) -> Tokenizer:
        """Train a byte-level BPE on `texts` (any iterable; `length` only feeds the progress display).

        Digits are split into runs of at most three before the GPT-2 word/space split, so that the
        vocabulary spends no entries on long numbers; any byte sequence stays encodable.
        """
        smallest = 256 + len(SPECIAL_TOKENS)
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size >= 2**31:
            raise InvalidValue("vocab_size", vocab_size, "must be an integer below 2^31 (token ids are 32-bit)")
        # the trainer sets aside a table of ~70 bytes per token up front: refuse before it aborts the process
        check_memory(BPE_BYTES_PER_TOKEN * vocab_size, f"training a {vocab_size:,}-token tokenizer",
                     hint="use a smaller vocabulary size")
        if vocab_size < smallest:
            raise InvalidValue("vocab_size", vocab_size, f"is too small: a byte-level BPE needs at least {smallest} "
                               f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
        backend = tokenizers.Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(tokenizers.Regex(r"\p{N}{1,3}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer, length=length)
        return cls(backend, eos_token=EOS, bos_token=BOS, pad_token=PAD)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """Read a `tokenizer.json`; BOS/EOS/PAD come from a `tokenizer_config.json` beside it when there is
        one, else from the usual spellings (DeepSeek's, GPT-2's, Llama's, ...)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, TOKENIZER_FILE)
        if not os.path.isfile(path):
            raise Dsv3Error(f"tokenizer {path} does not exist; give a tokenizer.json or a folder holding one")
        try:
            backend = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # the Rust side raises plain Exception for any parse problem
            raise Dsv3Error(f"{path} is not a tokenizer.json the tokenizers library can read ({e})") from None
        config = _read_config(os.path.join(os.path.dirname(path), CONFIG_FILE))
        vocab = backend.get_vocab(with_added_tokens=True)
        eos = _token_name(config.get("eos_token")) or next((t for t in EOS_SPELLINGS if t in vocab), None)
        if eos is None:
            raise Dsv3Error(f"tokenizer {path} has no end-of-text token; name it as eos_token in a "
                            f"{CONFIG_FILE} beside it")
        bos = _token_name(config.get("bos_token")) or next((t for t in BOS_SPELLINGS if t in vocab), None)
        pad = _token_name(config.get("pad_token")) or (PAD if PAD in vocab else None)
        return cls(backend, eos_token=eos, bos_token=bos, pad_token=pad, config=config or None)

    @classmethod
    def from_dir(cls, directory: str | os.PathLike) -> Tokenizer:
        """The tokenizer saved in a model or dataset folder."""
        return cls.from_file(os.path.join(os.fspath(directory), TOKENIZER_FILE))

    def save(self, directory: str | os.PathLike) -> None:
        """Write `tokenizer.json` and `tokenizer_config.json` into `directory` (atomically, each)."""
        directory = os.fspath(directory)
        atomic_write_text(os.path.join(directory, TOKENIZER_FILE), self.backend.to_str(pretty=True))
        config = json.dumps(self.config, indent=2, ensure_ascii=False) + "\n"
        atomic_write_text(os.path.join(directory, CONFIG_FILE), config)

    # ----- use ---------------------------------------------------------------------------------------
    def encode(self, text: str, bos: bool = False) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if bos and self.bos_id is not None else ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts at once (in parallel threads), without special tokens."""
        return [e.ids for e in self.backend.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """At least as many bytes as any one token stands for, so len(text in UTF-8) / max_token_bytes is a
        lower bound of the tokens a text becomes: a server refuses an oversized prompt without tokenizing it.
        (A byte-level vocabulary's characters each stand for one byte and take one to two in UTF-8.)"""
        return max(len(t.encode("utf-8")) for t in self.backend.get_vocab(with_added_tokens=True))

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(i)

    def sha256(self) -> str:
        """Identifies the tokenizer's behaviour: a hash of its serialised form and its special tokens."""
        identity = json.dumps([self.backend.to_str(), self.bos_token, self.eos_token, self.pad_token])
        return hashlib.sha256(identity.encode("utf-8")).hexdigest()


def check_vocab(tokenizer: Any, config: Any) -> None:
    """Raise `Dsv3Error` unless every id of `tokenizer` (a Tokenizer, or anything with `vocab_size` such as
    a DatasetInfo) has a row in the embedding of a model with `config.vocab_size`."""
    if tokenizer.vocab_size > config.vocab_size:
        raise Dsv3Error(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {config.vocab_size}; "
            f"prepare the data with --vocab-size {config.vocab_size} or less, or give the model a larger vocab_size"
        )


def _read_config(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise Dsv3Error(f"cannot read {path} ({e}); fix or remove it") from None
    if not isinstance(config, dict):
        raise Dsv3Error(f"{path} must hold a JSON object, not a JSON {type(config).__name__}; fix or remove it")
    return config


def _token_name(entry: Any) -> str | None:
    """tokenizer_config.json spells a special token as a string or as {"content": ...}."""
    if isinstance(entry, dict):
        entry = entry.get("content")
    return entry if isinstance(entry, str) else None


class ByteTokenizer:
    """A stand-in for models built from a preset, which come without a tokenizer: token id = UTF-8 byte.

    Any vocabulary of 256 or more covers it (the `tiny` preset has 512). Ids past 255 have no byte; they
    decode to U+FFFD, as invalid bytes do. There are no special tokens, so generation ends on length.
    """

    bos_id = None
    eos_id = None
    bos_token = eos_token = pad_token = None
    vocab_size = 256
    max_token_bytes = 1
    config: dict[str, Any] = {}  # no tokenizer_config.json, so no chat template: DeepSeek-V3's format

    def encode(self, text: str, bos: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def id_to_token(self, i: int) -> str:
        return self.decode([i])

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        out, run = [], bytearray()
        for i in ids:
            if i < 256:
                run.append(i)
                continue
            out.append(run.decode("utf-8", errors="replace") + "\ufffd")
            run = bytearray()
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)
