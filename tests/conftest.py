"""Shared fixtures. `figures` collects the numbers a test measured (parity errors, ...); they are printed in
pytest's closing summary, so the figures quoted in the docs come from the same run that checked them."""

import pytest

_FIGURES: list[str] = []


@pytest.fixture(scope="session")
def figures() -> list[str]:
    return _FIGURES


def pytest_terminal_summary(terminalreporter):
    if _FIGURES:
        terminalreporter.section("measured figures")
        for line in _FIGURES:
            terminalreporter.write_line(line)
