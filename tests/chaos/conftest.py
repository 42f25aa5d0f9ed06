"""The chaos suite's deployment (real processes) and its closing table."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.chaos.report import FaultRow, fault_rows, figures, write_summary
from tests.chaos.stack import ChaosStack, chaos_stack


@pytest.fixture(scope="session")
async def chaos() -> AsyncIterator[ChaosStack]:
    async with chaos_stack() as stack:
        yield stack


@pytest.fixture
async def stack(chaos: ChaosStack) -> ChaosStack:
    """The deployment with every part up, whatever the previous test broke."""
    await chaos.ensure_running()
    return chaos


@pytest.fixture
def report_fault(request: pytest.FixtureRequest) -> list[FaultRow]:
    return fault_rows(request.config)


@pytest.fixture
def report_figure(request: pytest.FixtureRequest) -> list[str]:
    return figures(request.config)


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    write_summary(terminalreporter, config)
