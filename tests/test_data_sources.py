"""Corpus sources: files, folders, globs and JSONL read as documents; the built-in corpus; every input error."""

import json
import os

import pytest

from dsv3.data import builtin
from dsv3.data.sources import read, resolve
from dsv3.errors import Dsv3Error


def write(path, text, mode="w"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, mode) as f:
        f.write(text)
    return str(path)


@pytest.fixture
def tree(tmp_path):
    write(tmp_path / "docs/b.txt", "bee")
    write(tmp_path / "docs/a.md", "ay")
    write(tmp_path / "docs/sub/c.txt", "sea")
    write(tmp_path / "docs/.hidden/x.txt", "hidden")
    write(tmp_path / "docs/.secret.txt", "hidden")
    write(tmp_path / "docs/__pycache__/m.pyc", b"\x00\xff", mode="wb")
    return tmp_path


def test_folder_is_read_recursively_in_sorted_order_without_hidden_entries(tree):
    files = resolve([str(tree / "docs")])
    assert [os.path.relpath(f, tree) for f in files] == ["docs/a.md", "docs/b.txt", "docs/sub/c.txt"]
    assert [d.text for d in read(files)] == ["ay", "bee", "sea"]


def test_globs_and_files_keep_argument_order_and_drop_repeats(tree):
    files = resolve([str(tree / "docs/sub/c.txt"), str(tree / "docs/**/*.txt")])
    assert [os.path.relpath(f, tree) for f in files] == ["docs/sub/c.txt", "docs/b.txt"]


def test_jsonl_gives_one_document_per_record(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"text": "one"}\n\n{"body": "x", "text": "two"}\n{"text": ""}\n')
    docs = list(read([path]))
    assert [(d.name, d.text) for d in docs] == [(f"{path}:1", "one"), (f"{path}:3", "two")]
    other = write(tmp_path / "e.jsonl", '{"body": "three"}\n')
    assert [d.text for d in read([other], text_field="body")] == ["three"]


def test_empty_files_are_skipped_and_a_byte_order_mark_dropped(tmp_path):
    empty = write(tmp_path / "empty.txt", "")
    bom = write(tmp_path / "bom.txt", "\ufeffhello")
    assert [d.text for d in read([empty, bom])] == ["hello"]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("missing.txt", "data source .*missing.txt does not exist"),
        ("nothing/*.txt", "glob .*nothing/\\*.txt' matches no files"),
    ],
)
def test_paths_that_name_nothing_are_refused(tmp_path, spec, message):
    with pytest.raises(Dsv3Error, match=message):
        resolve([str(tmp_path / spec)])


def test_empty_folder_is_refused(tmp_path):
    os.makedirs(tmp_path / "void")
    with pytest.raises(Dsv3Error, match="folder .*void holds no files"):
        resolve([str(tmp_path / "void")])


def test_non_utf8_file_is_named(tmp_path):
    path = write(tmp_path / "latin1.txt", "caf\xe9".encode("latin-1"), mode="wb")
    with pytest.raises(Dsv3Error, match=r"latin1.txt is not UTF-8 text \(byte 0xe9 at offset 3\)"):
        list(read([path]))


def test_unreadable_file_is_named(tmp_path):
    os.makedirs(tmp_path / "d")
    os.symlink(tmp_path / "gone.txt", tmp_path / "d/link.txt")  # listed by the walk, fails to open
    with pytest.raises(Dsv3Error, match="cannot read .*link.txt: no such file"):
        list(read(resolve([str(tmp_path / "d")])))


@pytest.mark.parametrize(
    "lines, message",
    [
        ('{"text": "ok"}\n{"text": "cut', r"line 2 of .*d.jsonl: invalid JSON \(Unterminated string"),
        ('{"text": "ok"}\n\n{"body": "x"}\n', r"line 3 of .*d.jsonl has no 'text' field \(its fields: 'body'\)"),
        ('{"text": ["a"]}\n', r"field 'text' on line 1 of .*d.jsonl is a JSON array, not a string"),
        ('["text"]\n', r"line 1 of .*d.jsonl is a JSON array, not an object"),
    ],
)
def test_malformed_jsonl_names_the_line(tmp_path, lines, message):
    path = write(tmp_path / "d.jsonl", lines)
    with pytest.raises(Dsv3Error, match=message):
        list(read([path]))


def test_builtin_corpus_is_documentation_and_stdlib_source():
    files = builtin.corpus_files()
    assert files == sorted(files) and "json/decoder.py" in files and "os.py" in files
    assert not any(f.startswith("_sysconfigdata") or "/test/" in f or "/tests/" in f for f in files)
    docs = list(builtin.documents())
    names = [d.name for d in docs]
    assert names[0].startswith("pydoc:") and names[-1].startswith("stdlib:")
    assert len(set(names)) == len(docs) > 400 and all(d.text for d in docs)
    assert sum(len(d.text.encode()) for d in docs) > 5_000_000
    json.dumps(builtin.stat_key())  # identifies the corpus in plain JSON
