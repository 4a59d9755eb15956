"""Shared fixtures. `figures` collects the numbers a test measured (parity errors, ...); they are printed in
pytest's closing summary, so the figures quoted in the docs come from the same run that checked them.
`single_thread` and `data` serve the trainer's tests: tiny models on one thread, and a small prepared corpus."""

import pydoc_data.topics

import pytest
from infer_models import one_thread

_FIGURES: list[str] = []


@pytest.fixture(scope="session")
def figures() -> list[str]:
    return _FIGURES


@pytest.fixture
def single_thread():
    """Tiny models run fastest on one thread, and a busy machine then slows them least."""
    with one_thread():
        yield


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A prepared dataset of 30 topics of Python's documentation, with a 512-token vocabulary."""
    from dsv3.data.prepare import prepare

    root = tmp_path_factory.mktemp("corpus")
    for topic in sorted(pydoc_data.topics.topics)[:30]:
        (root / f"{topic}.txt").write_text(pydoc_data.topics.topics[topic])
    return prepare([str(root)], root / "data", vocab_size=512, log=lambda _: None)


def pytest_terminal_summary(terminalreporter):
    if _FIGURES:
        terminalreporter.section("measured figures")
        for line in _FIGURES:
            terminalreporter.write_line(line)
