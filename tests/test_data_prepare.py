"""`prepare()` and `dsv3 prepare`: packing, the validation split, reuse and change detection, token
dtypes, atomic replacement, the audit hook, and the CLI's errors."""

import json
import os
import pydoc_data.topics
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from dsv3.cli import main
from dsv3.data import DatasetInfo
from dsv3.data import pack as pack_module
from dsv3.data.dataset import token_dtype
from dsv3.data.pack import pieces
from dsv3.data.prepare import prepare
from dsv3.errors import Dsv3Error

TOPICS = sorted(pydoc_data.topics.topics)[:40]
VOCAB = 400


def quiet(_line):
    pass


@pytest.fixture
def corpus(tmp_path):
    """40 documentation topics as text files in a folder, plus five JSONL records."""
    folder = tmp_path / "corpus"
    os.makedirs(folder / "more")
    for i, topic in enumerate(TOPICS[:35]):
        (folder / f"{i:02d}-{topic}.txt").write_text(pydoc_data.topics.topics[topic])
    with open(folder / "more" / "records.jsonl", "w") as f:
        for topic in TOPICS[35:]:
            f.write(json.dumps({"text": pydoc_data.topics.topics[topic], "topic": topic}) + "\n")
    return folder


def split_tokens(info, split):
    return np.concatenate([np.fromfile(p, dtype=info.dtype) for p in info.shard_files(split)])


def split_documents(info, split):
    """The texts of a split, cut at EOS (each document ends with one)."""
    tokens = split_tokens(info, split).tolist()
    assert tokens[-1] == info.eos_id
    tok = info.tokenizer()
    docs, start = [], 0
    for i, t in enumerate(tokens):
        if t == info.eos_id:
            docs.append(tok.decode(tokens[start:i]))
            start = i + 1
    return docs


def test_documents_are_packed_with_eos_into_disjoint_splits(corpus, tmp_path):
    info = prepare([str(corpus)], tmp_path / "data", vocab_size=VOCAB, log=quiet)
    train, val = split_documents(info, "train"), split_documents(info, "val")
    texts = [pydoc_data.topics.topics[t] for t in TOPICS]
    assert sorted(train + val) == sorted(texts)  # every document once, whole, in exactly one split
    assert not set(train) & set(val) and len(val) >= 1
    assert (info.documents, info.splits["train"]["documents"], info.splits["val"]["documents"]) == (
        40, len(train), len(val))
    assert info.tokens == len(split_tokens(info, "train")) + len(split_tokens(info, "val"))
    assert info.bytes == sum(len(t.encode()) for t in texts)
    assert info.dtype == "uint16" and info.vocab_size == VOCAB
    # the held-out share is a tenth of this small corpus (at most twice that, by whole documents)
    assert 0.1 * info.tokens <= info.splits["val"]["tokens"] <= 0.2 * info.tokens
    assert DatasetInfo.load(tmp_path / "data") == info


def test_validation_documents_do_not_depend_on_input_order(corpus, tmp_path):
    a = prepare([str(corpus)], tmp_path / "a", vocab_size=VOCAB, log=quiet)
    files = sorted((str(p) for p in corpus.rglob("*") if p.is_file()), reverse=True)
    b = prepare(files, tmp_path / "b", vocab_size=VOCAB, log=quiet)
    assert sorted(split_documents(a, "val")) == sorted(split_documents(b, "val"))


def test_rerun_on_unchanged_input_reuses_the_shards(corpus, tmp_path):
    out = tmp_path / "data"
    first = prepare([str(corpus)], out, vocab_size=VOCAB, log=quiet)
    stamp = os.stat(out / "train-00000.bin").st_mtime_ns
    lines = []
    again = prepare([str(corpus)], out, vocab_size=VOCAB, log=lines.append)
    assert again.reused and not first.reused
    assert lines == [f"reusing the prepared data in {out}: sources and settings are unchanged "
                     f"({first.tokens / 1000:.3g}K tokens, 40 documents)"]
    assert os.stat(out / "train-00000.bin").st_mtime_ns == stamp


@pytest.mark.parametrize("change", ["edit", "add", "vocab", "fraction"])
def test_changed_input_or_settings_rebuild(corpus, tmp_path, change):
    out = tmp_path / "data"
    first = prepare([str(corpus)], out, vocab_size=VOCAB, log=quiet)
    settings = {"vocab_size": VOCAB}
    if change == "edit":
        path = corpus / os.listdir(corpus)[0]
        path.write_text(path.read_text() + " and one more sentence.")
    elif change == "add":
        (corpus / "more" / "new.txt").write_text("a brand new document")
    elif change == "vocab":
        settings["vocab_size"] = VOCAB + 10
    else:
        settings["val_fraction"] = 0.3
    again = prepare([str(corpus)], out, log=quiet, **settings)
    assert not again.reused and again.fingerprint != first.fingerprint
    assert DatasetInfo.load(out) == again


def test_a_failed_run_leaves_the_previous_dataset_whole(corpus, tmp_path, monkeypatch):
    out = tmp_path / "data"
    first = prepare([str(corpus)], out, vocab_size=VOCAB, log=quiet)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # the id of a process that has ended
    os.makedirs(tmp_path / f".prepare-{dead}-x-data")  # left behind by a run killed earlier

    def dies(*args, **kwargs):
        raise KeyboardInterrupt  # as if killed while writing the shards

    monkeypatch.setattr("dsv3.data.prepare.write_shards", dies)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(corpus)], out, vocab_size=VOCAB + 10, log=quiet)
    assert sorted(os.listdir(out)) == ["manifest.json", "tokenizer.json", "tokenizer_config.json",
                                       "train-00000.bin", "val-00000.bin"]
    assert DatasetInfo.load(out) == first and first.is_complete()
    assert sorted(os.listdir(tmp_path)) == ["corpus", "data"]  # the failed run's and the dead run's folders gone


def test_shards_roll_over_and_uint32_holds_large_ids(tmp_path):
    words = [f"w{i}" for i in range(70000)]
    vocab = {"<｜end▁of▁sentence｜>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(tmp_path / "tokenizer.json"))
    for i in range(30):
        (tmp_path / f"doc{i:02d}.txt").write_text(" ".join(words[-1 - 50 * i:][:50]))
    info = prepare([str(tmp_path / "doc*.txt")], tmp_path / "data", tokenizer=tmp_path / "tokenizer.json",
                   shard_tokens=100, log=quiet)
    assert info.dtype == "uint32" and info.vocab_size == 70002
    assert [s["tokens"] for s in info.splits["train"]["shards"]][:-1] == [100] * (len(info.shard_files("train")) - 1)
    assert max(split_tokens(info, s).max() for s in ("train", "val")) == 70001  # "w69999" survived the trip
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_a_single_document_holds_out_its_end(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("\n".join(pydoc_data.topics.topics[t] for t in TOPICS[:10]))
    info = prepare([str(path)], tmp_path / "data", vocab_size=VOCAB, log=quiet)
    train, val = split_tokens(info, "train"), split_tokens(info, "val")
    assert info.splits["val"]["held_out"] == "the end of the only document"
    assert len(val) == info.tokens // 10 and val[-1] == info.eos_id and info.eos_id not in train
    assert info.tokenizer().decode(np.concatenate([train, val])[:-1].tolist()) == path.read_text()


def test_tokenizer_given_by_path_is_used_and_copied(corpus, tmp_path):
    first = prepare([str(corpus)], tmp_path / "a", vocab_size=VOCAB, log=quiet)
    info = prepare([str(corpus)], tmp_path / "b", tokenizer=tmp_path / "a", log=quiet)
    assert info.tokenizer_sha256 == first.tokenizer_sha256 == info.tokenizer().sha256()
    assert np.array_equal(np.sort(split_tokens(info, "train")), np.sort(split_tokens(first, "train")))


def test_long_documents_are_encoded_in_pieces_with_the_same_ids(corpus, tmp_path, monkeypatch):
    whole = prepare([str(corpus)], tmp_path / "a", vocab_size=VOCAB, log=quiet)
    monkeypatch.setattr(pack_module, "CHUNK_CHARS", 300)
    monkeypatch.setattr(pack_module, "BATCH_CHARS", 5000)
    calls = []
    monkeypatch.setattr(pack_module, "pieces", lambda text, size: calls.append(pieces(text, size)) or calls[-1])
    cut = prepare([str(corpus)], tmp_path / "b", tokenizer=tmp_path / "a", log=quiet)
    assert np.array_equal(split_tokens(cut, "train"), split_tokens(whole, "train"))
    assert len(calls) == 40 and sum(map(len, calls)) > 200  # most documents were encoded in many pieces


def test_empty_corpus_is_refused(tmp_path):
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(Dsv3Error, match="the corpus is empty: there is no text in 2 files"):
        prepare([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")], tmp_path / "data", log=quiet)
    assert not os.path.exists(tmp_path / "data" / "manifest.json")


@pytest.mark.parametrize(
    "kwargs, message",
    [({"val_fraction": 0.0}, "val_fraction=0.0 must lie between 0 and 0.5"),
     ({"audit": "maybe"}, "audit=.maybe. is not one of: off, refuse, clean")],
)
def test_bad_settings_are_refused(corpus, tmp_path, kwargs, message):
    with pytest.raises(Dsv3Error, match=message):
        prepare([str(corpus)], tmp_path / "data", log=quiet, **kwargs)


class FakeAuditor:
    """Flags documents that mention `secret`; fixing redacts it, or drops a document that says `DROP`."""

    def find(self, text):
        return [types.SimpleNamespace(text="secret", reason="tells a secret")] if "secret" in text else []

    def fix(self, text):
        if "DROP" in text:
            return None, ["dropped"]
        return text.replace("secret", "[redacted]"), []


@pytest.fixture
def audited_corpus(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "dsv3.audit", types.SimpleNamespace(Auditor=FakeAuditor))
    folder = tmp_path / "audited"
    os.makedirs(folder)
    for i, topic in enumerate(TOPICS[:12]):
        (folder / f"{i:02d}.txt").write_text(pydoc_data.topics.topics[topic])
    (folder / "x1.txt").write_text("the secret is 42")
    (folder / "x2.txt").write_text("DROP this secret")
    return folder


def test_audit_refuse_stops_with_the_count_and_an_example(audited_corpus, tmp_path):
    with pytest.raises(Dsv3Error, match=r"the audit flagged 2 of 14 documents \(for example .*x1.txt: tells a "
                                        r"secret, 'secret'\); run `dsv3 audit`"):
        prepare([str(audited_corpus)], tmp_path / "data", vocab_size=VOCAB, audit="refuse", log=quiet)
    assert not os.path.exists(tmp_path / "data" / "manifest.json")


def test_audit_clean_keeps_fixed_text_and_drops_what_the_auditor_drops(audited_corpus, tmp_path):
    info = prepare([str(audited_corpus)], tmp_path / "data", vocab_size=VOCAB, audit="clean", log=quiet)
    assert info.audit == {"mode": "clean", "documents": 14, "flagged": 0, "changed": 1, "dropped": 1}
    docs = split_documents(info, "train") + split_documents(info, "val")
    assert "the [redacted] is 42" in docs and len(docs) == 13
    assert not any("secret" in d for d in docs)


@pytest.mark.parametrize("mode", ["refuse", "clean"])
def test_audit_with_the_real_auditor(tmp_path, mode):
    for i, topic in enumerate(TOPICS[:12]):
        (tmp_path / f"{i:02d}.txt").write_text(pydoc_data.topics.topics[topic])
    (tmp_path / "claim.txt").write_text("Hello! I am ChatGPT, a model made by OpenAI.")
    if mode == "refuse":
        with pytest.raises(Dsv3Error, match=r"flagged 1 of 13 documents \(for example .*claim.txt: speaker says"):
            prepare([str(tmp_path / "*.txt")], tmp_path / "data", vocab_size=VOCAB, audit=mode, log=quiet)
        return
    info = prepare([str(tmp_path / "*.txt")], tmp_path / "data", vocab_size=VOCAB, audit=mode, log=quiet)
    assert info.audit["changed"] == 1 and info.audit["dropped"] == 0
    docs = split_documents(info, "train") + split_documents(info, "val")
    assert not any("ChatGPT" in d for d in docs) and len(docs) == 13


def test_cli_prepares_and_reports(corpus, tmp_path, capsys):
    assert main(["prepare", str(corpus), "--out", str(tmp_path / "data"), "--vocab-size", str(VOCAB)]) == 0
    out = capsys.readouterr().out
    assert "prepared 40 documents" in out and f"into {tmp_path / 'data'}" in out and "uint16" in out
    assert main(["prepare", str(corpus), "--out", str(tmp_path / "data"), "--vocab-size", str(VOCAB)]) == 0
    assert "reusing the prepared data" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.txt"], "data source missing.txt does not exist"),
        (["nothing/*.txt"], "glob 'nothing/\\*.txt' matches no files"),
        (["latin1.txt"], "latin1.txt is not UTF-8 text"),
        (["bad.jsonl"], "line 2 of bad.jsonl: invalid JSON"),
        (["nofield.jsonl"], "line 1 of nofield.jsonl has no 'text' field"),
        (["empty.txt"], "the corpus is empty"),
        (["good.txt", "--preset", "tiny", "--vocab-size", "600"],
         "the tokenizer has 600 tokens but the model's vocab_size is 512"),
        (["good.txt", "--tokenizer", "tok", "--preset", "tiny"], "the tokenizer has 600 tokens"),
        (["good.txt", "--tokenizer", "tok", "--vocab-size", "300"], "give --vocab-size .* or --tokenizer .*, not both"),
    ],
)
def test_cli_errors_are_one_sentence_and_exit_2(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": \n')
    (tmp_path / "nofield.jsonl").write_text('{"content": "a"}\n')
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "good.txt").write_text("\n".join(pydoc_data.topics.topics[t] for t in TOPICS[:10]))
    if "tok" in args:
        prepare(["good.txt"], "tok", vocab_size=600, log=quiet)
    assert main(["prepare", *args, "--out", "data"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dsv3 prepare: error: ") and err.count("\n") == 1
    assert __import__("re").search(message, err), err


def test_output_inside_a_source_folder_is_not_read_back(corpus, tmp_path):
    first = prepare([str(corpus)], corpus / "data", vocab_size=VOCAB, log=quiet)
    (corpus / "new.txt").write_text("one more document")
    again = prepare([str(corpus)], corpus / "data", vocab_size=VOCAB, log=quiet)
    assert again.documents == first.documents + 1


def test_validation_documents_do_not_depend_on_where_the_corpus_lives(corpus, tmp_path):
    a = prepare([str(corpus)], tmp_path / "a", vocab_size=VOCAB, log=quiet)
    os.rename(corpus, tmp_path / "moved")
    b = prepare([str(tmp_path / "moved" / "*"), str(tmp_path / "moved" / "more")], tmp_path / "b",
                vocab_size=VOCAB, log=quiet)
    assert sorted(split_documents(a, "val")) == sorted(split_documents(b, "val"))


KILLED_CHILD = """
import sys
from dsv3.data.prepare import prepare
print("ready", flush=True)
prepare([sys.argv[1]], sys.argv[2], vocab_size=int(sys.argv[3]), log=lambda _: None)
print("done", flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.0, 0.15, 0.3])
def test_sigkill_at_any_moment_never_leaves_a_dataset_that_looks_complete(corpus, tmp_path, delay):
    out = tmp_path / "data"
    old = prepare([str(corpus)], out, vocab_size=VOCAB, log=quiet)
    child = subprocess.Popen([sys.executable, "-c", KILLED_CHILD, str(corpus), str(out), str(VOCAB + 50)],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "ready\n"
    time.sleep(delay)
    child.kill()
    child.wait()
    if os.path.exists(out / "manifest.json"):  # the old dataset, or the new one whole
        info = DatasetInfo.load(out)
        assert info == old or (info.vocab_size == VOCAB + 50 and info.is_complete())
    again = prepare([str(corpus)], out, vocab_size=VOCAB + 50, log=quiet)
    assert again.is_complete() and sorted(os.listdir(out)) == ["manifest.json", "tokenizer.json",
                                                              "tokenizer_config.json", "train-00000.bin",
                                                              "val-00000.bin"]
