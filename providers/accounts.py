"""Provider accounts from configuration: which adapters exist, for which categories.

An account is one set of credentials at one provider (e.g. a marketing Twilio messaging
service apart from the transactional one). Accounts are listed in `CASCADE_PROVIDERS`
(JSON) or a TOML file (`CASCADE_PROVIDERS_FILE`, `[[providers]]` tables). Secrets never
need to be inline: a string value `"env:NAME"` reads the environment variable and
`"file:/path"` reads a secret file.

    [[providers]]
    type = "twilio"
    name = "twilio-marketing"     # unique: callbacks arrive at /v1/providers/<name>/status
    alias = "twilio"              # what a cascade step's `provider` names (default: type)
    categories = ["marketing"]    # empty: every category
    rate_per_second = 50
    [providers.config]
    account_sid = "AC…"
    auth_token = "env:TWILIO_MARKETING_TOKEN"
    messaging_service_sid = "MG…"
    [providers.price]             # optional: what its sends cost (providers/pricing.py)
    currency = "USD"
    prefixes = { "+1" = "0.0079" }
"""

from __future__ import annotations

import importlib
import json
import os
import re
import tomllib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx2
from pydantic import BaseModel, ConfigDict, Field

from providers.base import Category, Channel, InboundMessage, Provider, StatusUpdate
from providers.pricing import Price

ProviderType = Literal[
    "sandbox", "twilio", "smpp", "whatsapp", "telegram", "viber", "fcm", "webpush", "smtp"
]
StatusSink = Callable[[str, StatusUpdate], Awaitable[None]]
InboundSink = Callable[[str, InboundMessage], Awaitable[None]]


class ProviderAccount(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: ProviderType
    name: str = Field(pattern=r"^[a-z0-9_-]{1,40}$")
    alias: str | None = Field(default=None, pattern=r"^[a-z0-9_-]{1,40}$")
    categories: list[Category] = []
    rate_per_second: float | None = Field(default=None, gt=0)
    burst: int = Field(default=10, ge=1)
    # Requests to this account in flight at once, per worker process.
    max_in_flight: int = Field(default=64, ge=1)
    # The breaker opens at `breaker_threshold` provider errors in the window that are at
    # least `breaker_failure_ratio` of the account's answers in it.
    breaker_threshold: int = Field(default=5, ge=1)
    breaker_failure_ratio: float = Field(default=0.5, gt=0, le=1)
    breaker_window_seconds: float = Field(default=30, gt=0)
    breaker_cooldown_seconds: float = Field(default=30, gt=0)
    config: dict[str, Any] = {}
    price: Price | None = None

    @property
    def route(self) -> str:
        return self.alias or self.type

    def serves(self, category: Category) -> bool:
        return not self.categories or category in self.categories


class ConfigurationError(ValueError):
    pass


def resolve_secrets(value: Any) -> Any:
    """Replace `env:NAME` and `file:/path` strings (recursively) with what they point to."""
    if isinstance(value, Mapping):
        return {key: resolve_secrets(item) for key, item in value.items()}
    if isinstance(value, list):
        return [resolve_secrets(item) for item in value]
    if isinstance(value, str):
        if value.startswith("env:"):
            name = value[4:]
            if name not in os.environ:
                raise ConfigurationError(f"environment variable {name} is not set")
            return os.environ[name]
        if value.startswith("file:"):
            path = Path(value[5:])
            if not path.is_file():
                raise ConfigurationError(f"secret file {path} does not exist")
            return path.read_text().strip()
    return value


def load_accounts(inline: list[dict[str, Any]], file: Path | None) -> list[ProviderAccount]:
    raw = list(inline)
    if file is not None:
        raw.extend(tomllib.loads(file.read_text()).get("providers", []))
    accounts = [ProviderAccount.model_validate(item) for item in raw]
    names = [account.name for account in accounts]
    duplicates = {name for name in names if names.count(name) > 1}
    if duplicates:
        raise ConfigurationError(f"provider names must be unique: {sorted(duplicates)}")
    check_currencies(accounts)
    return accounts


def check_currencies(accounts: list[ProviderAccount]) -> str | None:
    """The one currency every priced account uses (None: none is priced). Costs are summed
    across accounts (a message's attempts, the stats), so mixing currencies is refused."""
    currencies = {a.price.currency for a in accounts if a.price is not None}
    if len(currencies) > 1:
        raise ConfigurationError(
            f"priced accounts must share one currency, not {sorted(currencies)}"
        )
    return next(iter(currencies), None)


@dataclass
class AdapterContext:
    """What adapters share: the SMPP status and inbound sinks, and HTTP clients, one per
    account, whose pool holds as many connections as the account allows requests in
    flight (`http`: one client for every account instead, e.g. in tests). A pool as
    large as its in-flight limit never queues a request, and keeps few idle connections:
    httpcore 1.0's pool pays per request for every connection it holds, squared for the
    idle ones (a shared 200-connection pool spent 80 % of a busy worker's CPU there)."""

    http: httpx2.AsyncClient | None = None
    on_status: StatusSink | None = None
    on_inbound: InboundSink | None = None
    timeout_seconds: float = 10.0
    _clients: list[httpx2.AsyncClient] = field(default_factory=list)

    def client_for(self, account: ProviderAccount) -> httpx2.AsyncClient:
        if self.http is not None:
            return self.http
        size = account.max_in_flight
        client = httpx2.AsyncClient(
            timeout=self.timeout_seconds,
            limits=httpx2.Limits(max_connections=size, max_keepalive_connections=size),
        )
        self._clients.append(client)
        return client

    async def aclose(self) -> None:
        for client in self._clients:
            await client.aclose()
        self._clients.clear()


def _import(module: str, attribute: str) -> Any:
    return getattr(importlib.import_module(f"providers.{module}"), attribute)


_ADAPTERS: dict[str, tuple[str, str, str]] = {
    # type: (module, config class, provider class)
    "twilio": ("twilio", "TwilioConfig", "TwilioProvider"),
    "smpp": ("smpp", "SmppConfig", "SmppProvider"),
    "whatsapp": ("whatsapp", "WhatsAppConfig", "WhatsAppProvider"),
    "telegram": ("telegram", "TelegramConfig", "TelegramProvider"),
    "viber": ("viber", "ViberConfig", "ViberProvider"),
    "fcm": ("fcm", "FcmConfig", "FcmProvider"),
    "webpush": ("webpush", "WebPushConfig", "WebPushProvider"),
    "smtp": ("smtp", "SmtpConfig", "SmtpProvider"),
}


def adapter_config(account: ProviderAccount) -> BaseModel:
    """The adapter's own config model, validated (secrets resolved): no network."""
    module, config_class, _ = _ADAPTERS[account.type]
    values = {**resolve_secrets(account.config), "name": account.name}
    config: BaseModel = _import(module, config_class).model_validate(values)
    return config


def build_adapters(account: ProviderAccount, context: AdapterContext) -> list[Provider]:
    """The adapter instances one account provides (sandbox: one per channel)."""
    if account.type == "sandbox":
        from providers.sandbox import SandboxConfig, SandboxProvider

        sandbox = SandboxConfig.model_validate(
            {**resolve_secrets(account.config), "name": account.name}
        )
        return [SandboxProvider(channel, sandbox) for channel in Channel]
    module, _, provider_class = _ADAPTERS[account.type]
    config = adapter_config(account)
    cls = _import(module, provider_class)
    if account.type == "smtp":
        return [cls(config)]
    if account.type == "smpp":
        sink, inbound_sink = context.on_status, context.on_inbound

        async def on_status(update: StatusUpdate) -> None:
            if sink is not None:
                await sink(account.name, update)

        async def on_inbound(message: InboundMessage) -> None:
            assert inbound_sink is not None
            await inbound_sink(account.name, message)

        return [cls(config, on_status=on_status, on_inbound=on_inbound if inbound_sink else None)]
    return [cls(config, http=context.client_for(account))]


# Credential shapes each provider documents; checked by `cascade providers check`.
_CREDENTIAL_FORMATS: dict[str, dict[str, str]] = {
    "twilio": {
        "account_sid": r"^AC[0-9a-fA-F]{32}$",
        "messaging_service_sid": r"^MG[0-9a-fA-F]{32}$",
        "from_number": r"^\+[1-9]\d{1,14}$|^[A-Za-z0-9 ]{1,11}$",
    },
    "telegram": {"bot_token": r"^\d+:[A-Za-z0-9_-]{20,}$"},
    "whatsapp": {"phone_number_id": r"^\d+$"},
    "fcm": {"project_id": r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$"},
}


def check_account(account: ProviderAccount) -> list[str]:
    """Problems with an account's configuration, found without contacting the provider."""
    try:
        values = resolve_secrets(account.config)
        if account.type != "sandbox":
            adapter_config(account)
    except (ConfigurationError, ValueError, ImportError) as exc:
        return [str(exc).strip()]
    problems = []
    for name, pattern in _CREDENTIAL_FORMATS.get(account.type, {}).items():
        value = values.get(name)
        if value is not None and not re.fullmatch(pattern, str(value)):
            problems.append(f"{name} does not look like a {account.type} {name}")
    if account.type == "fcm" and values.get("service_account_json"):
        try:
            key = json.loads(values["service_account_json"])
            missing = {"client_email", "private_key", "token_uri"} - key.keys()
            if missing:
                problems.append(f"service account JSON lacks {sorted(missing)}")
        except json.JSONDecodeError:
            problems.append("service_account_json is not JSON")
    return problems
