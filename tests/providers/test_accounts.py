"""Provider accounts from configuration: secrets, routing per category, format checks."""

from __future__ import annotations

from pathlib import Path

import httpx2
import pytest
from typer.testing import CliRunner

from app.cli import cli
from providers.accounts import (
    AdapterContext,
    ConfigurationError,
    ProviderAccount,
    check_account,
    load_accounts,
    resolve_secrets,
)
from providers.base import Category, Channel
from providers.registry import ProviderRegistry, UnknownProvider

TWILIO = {"account_sid": "AC" + "0" * 32, "auth_token": "t", "from_number": "+48600100200"}


def test_secrets_come_from_env_and_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TWILIO_TOKEN", "from-env")
    secret = tmp_path / "token"
    secret.write_text("from-file\n")

    resolved = resolve_secrets({"a": "env:TWILIO_TOKEN", "b": [f"file:{secret}"], "c": "plain"})

    assert resolved == {"a": "from-env", "b": ["from-file"], "c": "plain"}
    with pytest.raises(ConfigurationError):
        resolve_secrets("env:CASCADE_SURELY_UNSET")


def test_accounts_load_from_toml_and_names_are_unique(tmp_path: Path) -> None:
    file = tmp_path / "providers.toml"
    file.write_text(
        '[[providers]]\ntype = "twilio"\nname = "twilio-mkt"\nalias = "twilio"\n'
        'categories = ["marketing"]\n[providers.config]\naccount_sid = "AC1"\n'
    )
    accounts = load_accounts([{"type": "twilio", "name": "twilio"}], file)
    assert [a.name for a in accounts] == ["twilio", "twilio-mkt"]
    with pytest.raises(ConfigurationError):
        load_accounts([{"type": "twilio", "name": "twilio-mkt"}], file)


async def test_a_category_account_wins_over_the_general_one() -> None:
    general = ProviderAccount(type="twilio", name="twilio", config=TWILIO)
    marketing = ProviderAccount(
        type="twilio",
        name="twilio-mkt",
        alias="twilio",
        categories=[Category.MARKETING],
        config={**TWILIO, "from_number": "PROMO"},
    )
    async with httpx2.AsyncClient() as http:
        registry = ProviderRegistry.from_accounts(
            [general, marketing], {Channel.SMS: "twilio"}, AdapterContext(http)
        )
        assert registry.get(Channel.SMS, None, Category.MARKETING).name == "twilio-mkt"
        assert registry.get(Channel.SMS, "twilio", Category.TRANSACTIONAL).name == "twilio"
        assert registry.get(Channel.SMS, "twilio-mkt", Category.MARKETING).name == "twilio-mkt"
        with pytest.raises(UnknownProvider):
            registry.get(Channel.SMS, "twilio-mkt", Category.TRANSACTIONAL)
        with pytest.raises(UnknownProvider):
            registry.get(Channel.EMAIL, "twilio", Category.TRANSACTIONAL)


def test_check_finds_malformed_credentials_without_sending() -> None:
    good = ProviderAccount(type="twilio", name="twilio", config=TWILIO)
    bad_sid = ProviderAccount(type="twilio", name="t2", config={**TWILIO, "account_sid": "XX1"})
    no_sender = ProviderAccount(
        type="twilio", name="t3", config={"account_sid": TWILIO["account_sid"], "auth_token": "t"}
    )

    assert check_account(good) == []
    assert check_account(bad_sid) == ["account_sid does not look like a twilio account_sid"]
    assert "from_number or messaging_service_sid" in check_account(no_sender)[0]


def test_providers_check_command_reports_and_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "CASCADE_PROVIDERS",
        '[{"type": "telegram", "name": "tg", "config": {"bot_token": "not a token"}}]',
    )
    result = CliRunner().invoke(cli, ["providers", "check"])

    assert result.exit_code == 1
    assert "bot_token does not look like a telegram bot_token" in result.output


async def test_an_accounts_own_name_wins_over_accounts_routed_under_it() -> None:
    slow = ProviderAccount(type="twilio", name="twilio-slow", config=TWILIO, rate_per_second=1)
    main = ProviderAccount(type="twilio", name="twilio", config=TWILIO)
    async with httpx2.AsyncClient() as http:
        registry = ProviderRegistry.from_accounts(
            [slow, main], {Channel.SMS: "twilio"}, AdapterContext(http)
        )
        assert registry.get(Channel.SMS, None, Category.TRANSACTIONAL).name == "twilio"
        assert registry.get(Channel.SMS, "twilio-slow", Category.MARKETING).name == "twilio-slow"
