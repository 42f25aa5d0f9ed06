"""`cascade worker --queues/--nice`: which workers a process builds, and how the options parse.

No Redis or Postgres: arq workers connect only when run, and the CLI tests replace the
embedded servers and the event loop with recorders.
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any, cast

import pytest
import uvloop
from typer.testing import CliRunner

import app.cli
import app.worker
from app.queue import WEBHOOKS_QUEUE, queue_name
from app.runtime import Runtime
from app.settings import Settings
from app.worker import PROCESS_SPLIT, QUEUES, build_workers, parse_queues
from providers.base import Category

runner = CliRunner()


def stub_runtime() -> Runtime:
    # build_workers reads only the settings; the runtime itself goes into the jobs' ctx.
    settings = Settings(redis_url="redis://127.0.0.1:1/0", database_url="postgresql://x/y")
    return cast(Runtime, SimpleNamespace(settings=settings))


def crons(workers: list[Any]) -> dict[str, list[str]]:
    return {w.queue_name: sorted(c.name for c in w.cron_jobs) for w in workers}


async def test_all_queues_by_default_each_cron_on_its_own_queue() -> None:
    workers = build_workers(stub_runtime())

    assert crons(workers) == {
        queue_name(Category.TRANSACTIONAL): [],
        queue_name(Category.SERVICE): [],
        queue_name(Category.MARKETING): ["prune_marketing_sends"],
        WEBHOOKS_QUEUE: ["sweep_webhooks"],
    }


async def test_a_subset_builds_only_those_workers() -> None:
    runtime = stub_runtime()

    marketing = build_workers(runtime, ("marketing",))
    rest = build_workers(runtime, ("transactional", "service", "webhooks"))

    assert crons(marketing) == {queue_name(Category.MARKETING): ["prune_marketing_sends"]}
    assert crons(rest) == {
        queue_name(Category.TRANSACTIONAL): [],
        queue_name(Category.SERVICE): [],
        WEBHOOKS_QUEUE: ["sweep_webhooks"],
    }
    assert marketing[0].max_jobs == runtime.settings.worker_concurrency[Category.MARKETING]
    assert "cancel_provider_send" in marketing[0].functions
    assert "deliver_webhook" not in marketing[0].functions


def test_the_recommended_split_covers_every_queue_once() -> None:
    names = [name for queues, _ in PROCESS_SPLIT for name in parse_queues([queues])]

    assert sorted(names) == sorted(QUEUES)
    assert dict((q, n) for q, n in PROCESS_SPLIT)["marketing"] > 0


def test_parse_queues_takes_repeats_and_commas_in_a_fixed_order() -> None:
    assert parse_queues([]) == QUEUES
    assert parse_queues(["webhooks, service", "transactional", "service"]) == (
        "transactional",
        "service",
        "webhooks",
    )
    with pytest.raises(ValueError, match="unknown queue 'bulk'; choose from transactional"):
        parse_queues(["marketing,bulk"])


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """What `cascade worker` would have run: the queues passed to serve, the nice calls."""
    seen: dict[str, Any] = {"nice": []}
    servers = SimpleNamespace(stop=lambda: None)
    monkeypatch.setattr(app.cli, "_resolved", lambda settings, *args, **kwargs: (settings, servers))
    monkeypatch.setattr(app.cli, "configure_logging", lambda: None)
    monkeypatch.setattr(app.worker, "serve", lambda factory, queues: queues)
    monkeypatch.setattr(uvloop, "run", lambda queues: seen.update(queues=queues))
    monkeypatch.setattr(os, "nice", lambda increment: seen["nice"].append(increment))
    return seen


def test_worker_runs_the_named_queues_niced(started: dict[str, Any]) -> None:
    result = runner.invoke(
        app.cli.cli,
        ["worker", "--queues", "marketing", "--nice", "10"],
        env={"COLUMNS": "220", "CASCADE_DEV_MODE": "true"},
    )

    assert result.exit_code == 0, result.output
    assert started == {"queues": ("marketing",), "nice": [10]}


def test_worker_defaults_to_every_queue_at_normal_priority(started: dict[str, Any]) -> None:
    result = runner.invoke(
        app.cli.cli, ["worker"], env={"COLUMNS": "220", "CASCADE_DEV_MODE": "true"}
    )

    assert result.exit_code == 0, result.output
    assert started == {"queues": QUEUES, "nice": []}


def test_worker_rejects_an_unknown_queue(started: dict[str, Any]) -> None:
    result = runner.invoke(
        app.cli.cli,
        ["worker", "--queues", "transactional,bulk"],
        env={"COLUMNS": "220", "CASCADE_DEV_MODE": "true"},
    )

    assert result.exit_code == 2
    assert "--queues" in result.output
    assert "unknown queue 'bulk'; choose from transactional, service, marketing," in result.output
    assert started == {"nice": []}
