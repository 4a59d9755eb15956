"""The byte-level BPE tokenizer: training, exact round trips, DeepSeek's special tokens, files that
transformers loads, tokenizer.json files from elsewhere, and the vocabulary check."""

import json
import pydoc_data.topics

import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from dsv3.config import preset
from dsv3.data.pack import pieces
from dsv3.errors import Dsv3Error
from dsv3.tokenizer import BOS, EOS, PAD, SPECIAL_TOKENS, Tokenizer, check_vocab

TEXTS = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
SAMPLES = [
    "def f(x):\n    return x ** 2  # square\n",
    "Unicode: café, naïve, 漢字, emoji 🙂, and a zero-width joiner \u200d.",
    "  leading spaces, trailing tabs\t\t\r\nwindows newline and 1234567 digits",
    f"special text inside: {BOS}hello{EOS} <｜User｜>hi<｜Assistant｜>",
    "",
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(TEXTS, vocab_size=600)


def test_trained_tokenizer_has_the_asked_size_and_deepseek_special_tokens_first(tok):
    assert tok.vocab_size == 600
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert SPECIAL_TOKENS == ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<｜User｜>",
                              "<｜Assistant｜>")


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_is_exact(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_encode_adds_bos_only_when_asked_and_special_tokens_stay_whole(tok):
    ids = tok.encode("a<｜User｜>b")
    assert 3 in ids and 0 not in ids
    assert tok.encode("a", bos=True) == [0, *tok.encode("a")]
    assert tok.decode(tok.encode(SAMPLES[3]), skip_special_tokens=True) == "special text inside: hello hi"


def test_digits_are_split_into_runs_of_at_most_three(tok):
    pieces_ = [tok.decode([i]) for i in tok.encode("1234567")]
    assert "".join(pieces_) == "1234567" and max(map(len, pieces_)) <= 3


def test_training_is_deterministic(tok):
    assert Tokenizer.train(TEXTS, vocab_size=600).sha256() == tok.sha256()
    assert Tokenizer.train(TEXTS, vocab_size=601).sha256() != tok.sha256()


def test_save_and_load_give_the_same_tokenizer(tok, tmp_path):
    tok.save(tmp_path)
    again = Tokenizer.from_dir(tmp_path)
    assert again.sha256() == tok.sha256()
    assert again.encode(SAMPLES[1]) == tok.encode(SAMPLES[1])
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == (BOS, EOS, PAD)


def test_saved_tokenizer_loads_in_transformers(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == (BOS, EOS, PAD)
    assert (hf.bos_token_id, hf.eos_token_id) == (tok.bos_id, tok.eos_id)
    for text in SAMPLES:
        assert hf(text)["input_ids"] == tok.encode(text)
        assert hf.decode(tok.encode(text)) == text


def test_encoding_a_long_text_in_pieces_changes_nothing(tok):
    text = "\n".join(TEXTS[:20])
    parts = pieces(text, size=1000)
    assert len(parts) > 10 and "".join(parts) == text
    assert [i for p in parts for i in tok.encode(p)] == tok.encode(text)


def test_foreign_tokenizer_json_finds_its_end_of_text_token(tmp_path):
    vocab = {"<|endoftext|>": 0, "<unk>": 1, "hello": 2, "world": 3}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert (tok.eos_token, tok.eos_id, tok.bos_id) == ("<|endoftext|>", 0, None)
    assert tok.encode("hello world") == [2, 3]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "world"}}))
    assert Tokenizer.from_dir(tmp_path).eos_id == 3


def test_tokenizer_file_errors_name_the_file(tmp_path):
    with pytest.raises(Dsv3Error, match="tokenizer .*nope.json does not exist"):
        Tokenizer.from_file(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(Dsv3Error, match="bad.json is not a tokenizer.json"):
        Tokenizer.from_file(tmp_path / "bad.json")
    backend = tokenizers.Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    backend.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(Dsv3Error, match="has no end-of-text token; name it as eos_token"):
        Tokenizer.from_dir(tmp_path)


def test_vocabulary_must_fit_the_model(tok):
    check_vocab(tok, preset("tiny").replace(vocab_size=600))
    with pytest.raises(Dsv3Error, match="the tokenizer has 600 tokens but the model's vocab_size is 512"):
        check_vocab(tok, preset("tiny"))


def test_vocab_size_too_small_for_bytes_is_refused():
    with pytest.raises(Dsv3Error, match="vocab_size=100 is too small: a byte-level BPE needs at least 261"):
        Tokenizer.train(["abc"], vocab_size=100)
