"""Security suite: the figures it measures join the chaos suite's closing summary."""

from __future__ import annotations

import pytest

from tests.chaos.report import figures, write_summary


@pytest.fixture
def report_figure(request: pytest.FixtureRequest) -> list[str]:
    return figures(request.config)


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    write_summary(terminalreporter, config)
