"""The built-in corpus: English documentation and Python source that ship with every Python.

Nothing is downloaded. Two parts, in this order:

1. `pydoc_data.topics`: the language reference and library topics that `help()` shows (about 0.47 MB
   of English prose, one document per topic, sorted by topic name);
2. the pure-Python standard library: every top-level module plus the packages in `STDLIB_PACKAGES`
   (their docstrings and comments are English, their code is idiomatic Python), one document per
   file, sorted by path. Test suites, IDLE, Tk, 2to3, distutils and the codec tables are left out:
   they are either large and repetitive or missing from some distributions' Python packages.

The selection depends only on the Python version, so two machines with the same Python build read
the same bytes; `corpus_files()` is what a re-run compares to decide whether the data changed.
"""

from __future__ import annotations

import os
import pydoc_data.topics
import sys
import sysconfig
from collections.abc import Iterator

from dsv3.data.sources import Document

# Packages whose Python files join the top-level modules. All are pure Python and present in every
# CPython distribution (Debian and friends split out tkinter, lib2to3, distutils, venv and ensurepip).
STDLIB_PACKAGES = (
    "asyncio", "collections", "concurrent", "email", "html", "http", "importlib", "json", "logging",
    "multiprocessing", "re", "sqlite3", "tomllib", "unittest", "urllib", "wsgiref", "xml", "xmlrpc",
    "zoneinfo",
)
# Folder names skipped inside those packages: test suites and bytecode caches.
SKIP_DIRS = {"test", "tests", "__pycache__"}
# Top-level modules that describe the machine the interpreter was built on rather than Python.
SKIP_MODULE_PREFIXES = ("_sysconfigdata",)

NAME = "builtin"


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def corpus_files() -> list[str]:
    """The standard-library files of the corpus, as sorted paths relative to `stdlib_dir()`."""
    root = stdlib_dir()
    files = [
        name for name in os.listdir(root)
        if name.endswith(".py") and not name.startswith(SKIP_MODULE_PREFIXES)
        and os.path.isfile(os.path.join(root, name))
    ]
    for package in STDLIB_PACKAGES:
        for folder, dirs, names in os.walk(os.path.join(root, package)):
            dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
            rel = os.path.relpath(folder, root)
            files += [os.path.join(rel, n) for n in names if n.endswith(".py")]
    return sorted(f.replace(os.sep, "/") for f in files)


def stat_key() -> list:
    """What identifies the corpus on this machine without reading it: the Python version and the size
    and modification time of every file it comes from."""
    root = stdlib_dir()
    named = [("pydoc_data/topics.py", pydoc_data.topics.__file__)]
    named += [(rel, os.path.join(root, rel)) for rel in corpus_files()]
    stats = [(rel, os.stat(path).st_size, os.stat(path).st_mtime_ns) for rel, path in named]
    return [NAME, sys.version, stats]


def documents() -> Iterator[Document]:
    """The corpus as documents named `pydoc:<topic>` and `stdlib:<path>`; empty files are skipped."""
    for topic in sorted(pydoc_data.topics.topics):
        yield Document(f"pydoc:{topic}", pydoc_data.topics.topics[topic])
    root = stdlib_dir()
    for rel in corpus_files():
        with open(os.path.join(root, rel), encoding="utf-8") as f:
            text = f.read()
        if text:
            yield Document(f"stdlib:{rel}", text)
