"""Outside `cascade dev` the processes refuse to start on development defaults, and
`compose.yaml` is the production-like start (checked for structure: no images here)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.runtime import provider_accounts
from app.settings import DEV_RECEIPT_KEYS, Settings
from tests.conftest import CASCADE_BIN

ROOT = Path(__file__).resolve().parents[2]
PRODUCTION = {
    "CASCADE_DATABASE_URL": "postgresql://cascade:cascade@127.0.0.1:1/cascade",
    "CASCADE_REDIS_URL": "redis://127.0.0.1:1/0",
    "CASCADE_API_KEY_PEPPER": "a-real-pepper",
    "CASCADE_UNSUBSCRIBE_SECRET": "a-real-unsubscribe-secret",
    "CASCADE_RECEIPT_KEYS": "rk1:a-real-receipt-secret",
}


def run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CASCADE_")}
    return subprocess.run(
        [CASCADE_BIN, *args],
        cwd=cwd,
        env={**clean, "COLUMNS": "300", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("command", [["api"], ["worker"]])
def test_api_and_worker_refuse_dev_defaults_naming_what_is_missing(
    command: list[str], tmp_path: Path
) -> None:
    refused = run(command, tmp_path)

    assert refused.returncode == 1, (refused.stdout, refused.stderr)
    said = " ".join(refused.stdout.split())
    for name in PRODUCTION:
        assert name in said
    assert "Traceback" not in refused.stdout + refused.stderr
    assert not (tmp_path / ".cascade").exists()  # no embedded server was started


def test_a_sandbox_turned_on_in_production_needs_its_own_secret(tmp_path: Path) -> None:
    refused = run(["api"], tmp_path, **PRODUCTION, CASCADE_SANDBOX_ENABLED="true")

    assert refused.returncode == 1
    said = " ".join(refused.stdout.split())
    assert "set CASCADE_SANDBOX_SECRET " in said
    assert "CASCADE_DATABASE_URL" not in said


@pytest.mark.parametrize(
    "receipt_keys",
    [
        None,
        "",
        DEV_RECEIPT_KEYS,
        "rk1:cascade-receipt-dev-secret",
        "rk2:new,dev:cascade-receipt-dev-secret",
    ],
)
def test_receipt_keys_unset_or_on_the_dev_secret_refuse_to_start(
    receipt_keys: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in os.environ:
        if key.startswith("CASCADE_"):
            monkeypatch.delenv(key)
    production = {k: v for k, v in PRODUCTION.items() if k != "CASCADE_RECEIPT_KEYS"}
    for key, value in production.items():
        monkeypatch.setenv(key, value)
    if receipt_keys is not None:
        monkeypatch.setenv("CASCADE_RECEIPT_KEYS", receipt_keys)

    assert Settings().missing_for_production() == ["CASCADE_RECEIPT_KEYS"]
    assert Settings(dev_mode=True).missing_for_production() == []


def test_the_api_refuses_to_start_without_receipt_keys(tmp_path: Path) -> None:
    production = {k: v for k, v in PRODUCTION.items() if k != "CASCADE_RECEIPT_KEYS"}

    refused = run(["api"], tmp_path, **production)

    assert refused.returncode == 1
    said = " ".join(refused.stdout.split())
    assert "set CASCADE_RECEIPT_KEYS " in said
    assert "CASCADE_API_KEY_PEPPER" not in said


def test_migrate_without_a_database_url_refuses_outside_dev(tmp_path: Path) -> None:
    refused = run(["migrate"], tmp_path)

    assert refused.returncode == 1
    assert "CASCADE_DATABASE_URL" in refused.stdout
    assert not (tmp_path / ".cascade").exists()


def test_sandbox_providers_are_opt_in_outside_dev_mode() -> None:
    """Not even a complete production configuration turns them on implicitly."""

    def names(**settings: Any) -> set[str]:
        return {account.name for account in provider_accounts(Settings(**settings))}

    assert "sandbox" not in names()
    assert "sandbox" in names(dev_mode=True)
    assert "sandbox" in names(sandbox_enabled=True)
    assert "sandbox" not in names(dev_mode=True, sandbox_enabled=False)
    production = Settings(**{k.removeprefix("CASCADE_").lower(): v for k, v in PRODUCTION.items()})
    assert production.missing_for_production() == []
    assert not production.sandbox_active
    assert "sandbox" not in {account.name for account in provider_accounts(production)}


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return loaded


def test_compose_runs_postgres_redis_migrate_api_and_worker_with_health_checks() -> None:
    services = compose()["services"]

    assert set(services) == {"postgres", "redis", "migrate", "api", "worker"}
    assert services["postgres"]["image"].startswith("postgres:")
    assert services["redis"]["image"].startswith("redis:")
    assert services["migrate"]["command"] == ["cascade", "migrate"]
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    for name in ("migrate", "api", "worker"):  # built here, never pulled
        assert (services[name]["build"], services[name]["image"]) == (".", "cascade")
    for name in ("api", "worker"):
        assert services[name]["command"][:2] == ["cascade", name]
        assert services[name]["depends_on"] == {
            "migrate": {"condition": "service_completed_successfully"},
            "postgres": {"condition": "service_healthy"},
            "redis": {"condition": "service_healthy"},
        }
    for name in ("postgres", "redis", "api", "worker"):
        assert services[name]["healthcheck"]["test"], name
    assert "--metrics-port" in services["worker"]["command"]  # what its health check reads


@pytest.mark.parametrize("service", ["migrate", "api", "worker"])
def test_compose_environment_passes_the_production_checks(
    service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the user's .env filled in, the settings compose gives are not dev defaults."""
    for key in os.environ:
        if key.startswith("CASCADE_"):
            monkeypatch.delenv(key)
    environment = compose()["services"][service]["environment"]
    assert "CASCADE_DEV_MODE" not in environment
    for key, value in environment.items():
        monkeypatch.setenv(key, _interpolate(str(value)))

    settings = Settings()

    assert settings.missing_for_production() == []
    assert not settings.sandbox_active
    assert provider_accounts(settings) == []


def _interpolate(value: str) -> str:
    """Compose's `${VAR:-default}` / `${VAR:?error}`, with the required ones given."""

    def one(match: re.Match[str]) -> str:
        name, kind, rest = match.group(1), match.group(2), match.group(3)
        if kind == ":?":
            return f"key:value-of-{name}"  # a value for any secret, `kid:secret` ones too
        return rest

    return re.sub(r"\$\{(\w+)(:-|:\?)([^}]*)\}", one, value)
