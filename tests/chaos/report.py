"""Figures the chaos and security suites measure, printed at the end of the run.

Tests never print (ruff T20): they append rows here and a `pytest_terminal_summary` hook
writes them through the terminal reporter.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest


@dataclass(frozen=True, slots=True)
class FaultRow:
    fault: str
    injected: int
    messages: int
    lost: int
    duplicates: int
    server_errors: int
    note: str = ""


FAULTS = pytest.StashKey[list[FaultRow]]()
FIGURES = pytest.StashKey[list[str]]()

HEADER = ("fault injected", "times", "messages", "lost", "duplicates sent", "5xx seen", "notes")


def fault_rows(config: pytest.Config) -> list[FaultRow]:
    return config.stash.setdefault(FAULTS, [])


def figures(config: pytest.Config) -> list[str]:
    return config.stash.setdefault(FIGURES, [])


def write_summary(reporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    """Write what was measured, once (the chaos and security conftests both call this)."""
    rows, lines = config.stash.get(FAULTS, []), config.stash.get(FIGURES, [])
    config.stash[FAULTS], config.stash[FIGURES] = [], []
    if rows:
        _write_faults(reporter, rows)
    if lines:
        reporter.section("chaos and security: figures")
        for line in lines:
            reporter.write_line(line)


def _write_faults(reporter: pytest.TerminalReporter, rows: list[FaultRow]) -> None:
    table = [HEADER] + [
        (
            row.fault,
            str(row.injected),
            str(row.messages),
            str(row.lost),
            str(row.duplicates),
            str(row.server_errors),
            row.note,
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADER))]
    reporter.section("chaos: faults injected and what they cost")
    for index, line in enumerate(table):
        reporter.write_line(
            " | ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True))
        )
        if index == 0:
            reporter.write_line("-+-".join("-" * width for width in widths))
