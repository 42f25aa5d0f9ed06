"""All configuration, from `CASCADE_*` environment variables (or a `.env` file)."""

from __future__ import annotations

from datetime import timedelta
from functools import cached_property
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.auth.receipts import ReceiptKeys
from providers.base import Category, Channel

DEV_API_KEY_PEPPER = "cascade-dev-pepper"
DEV_SANDBOX_SECRET = "cascade-sandbox-dev-secret"
DEV_UNSUBSCRIBE_SECRET = "cascade-unsubscribe-dev-secret"
DEV_RECEIPT_KEYS = "dev:cascade-receipt-dev-secret"


class Settings(BaseSettings):
    # An invalid value is not echoed: it may be a secret.
    model_config = SettingsConfigDict(
        env_prefix="CASCADE_", env_file=".env", extra="ignore", hide_input_in_errors=True
    )

    # `cascade dev` and the tests: embedded servers, the built-in secrets and the sandbox
    # providers are allowed. Off (production), `cascade api`/`worker` refuse to start on them.
    dev_mode: bool = False

    # No URL means: start the embedded servers under `data_dir`.
    database_url: str | None = None
    redis_url: str | None = None
    data_dir: Path = Path(".cascade")

    # Where providers reach us (status callbacks are built from it).
    public_url: str = "http://127.0.0.1:8000"

    # Hashing pepper for API keys: a leaked table alone does not yield usable keys.
    api_key_pepper: SecretStr = SecretStr(DEV_API_KEY_PEPPER)
    # Signs push receipt tokens: `kid:secret,…`, the first signs and all verify (rotation:
    # add a new key, then list it first, then drop the old one). Unset: a dev key (dev mode).
    receipt_keys: SecretStr = SecretStr("")
    sandbox_secret: SecretStr = SecretStr(DEV_SANDBOX_SECRET)
    sandbox_delay: timedelta = timedelta(milliseconds=150)

    default_timeouts: dict[Channel, int] = Field(
        default_factory=lambda: {
            Channel.PUSH: 30,
            Channel.MESSENGER: 60,
            Channel.SMS: 120,
            Channel.EMAIL: 300,
        }
    )
    default_providers: dict[Channel, str] = Field(
        default_factory=lambda: {channel: "sandbox" for channel in Channel}
    )
    # Provider accounts (see providers/accounts.py): JSON here, or a TOML file.
    providers: list[dict[str, Any]] = []
    providers_file: Path | None = None
    # The sandbox providers: None means on in dev mode only (opt-in in production).
    sandbox_enabled: bool | None = None
    max_body_bytes: int = 256 * 1024
    # Per API key, shared by every API process (Redis GCRA): sustained rate and burst.
    api_rate_per_second: float = 100.0
    api_burst: int = 200
    max_cascade_steps: int = 8
    # Group commit in each API process (accepts, provider receipts): rows per flush, how
    # long a gathering flush waits for more while another writes, and flushes at once.
    group_commit_max_items: int = Field(default=256, ge=1, le=5000)
    group_commit_max_wait_ms: float = Field(default=2.0, ge=0, le=100)
    group_commit_flushes: int = Field(default=4, ge=1, le=16)

    # Delivery engine, per category and worker process: messages with their providers at
    # once (transactional gets the largest share), messages per claim, and the longest
    # pause between looks at the ledger when no wake-up comes (Redis lost, a timer).
    worker_concurrency: dict[Category, int] = Field(
        default_factory=lambda: {
            Category.TRANSACTIONAL: 256,
            Category.SERVICE: 128,
            Category.MARKETING: 128,
        }
    )
    engine_batch_size: int = Field(default=100, ge=1, le=1000)
    engine_poll_seconds: float = Field(default=1.0, gt=0)
    worker_poll_delay: float = 0.05
    # Webhook events undispatched this long are dispatched by the webhook sweep.
    sweep_grace: timedelta = timedelta(seconds=30)
    sweep_interval_seconds: int = 10
    # arq re-runs a job whose worker died only once this (plus 10 s) has passed.
    job_timeout_seconds: int = 60
    retry_base_delay: float = 0.2
    retry_max_delay: float = 30.0

    # Customer webhooks: plain http to loopback only in dev mode (`cascade dev`, tests).
    webhooks_allow_loopback_http: bool = False
    webhook_concurrency: int = 50

    # Policy and templates (tenants override these with PUT /v1/policy).
    unsubscribe_secret: SecretStr = SecretStr(DEV_UNSUBSCRIBE_SECRET)
    default_timezone: str = "UTC"
    default_locale: str = "en"
    # How long marketing sends are remembered: frequency-cap windows and inbound STOPs.
    marketing_log_retention: timedelta = timedelta(days=30)
    # A reply belongs to the tenants whose messages reached its sender within this.
    inbound_reply_window: timedelta = timedelta(days=30)
    max_batch_body_bytes: int = 4 * 1024 * 1024

    # Postgres connections per process, all kept open: with overflow connections on top,
    # every burst opened and closed connections (a Postgres backend fork each).
    db_pool_size: int = 20

    @field_validator("receipt_keys")
    @classmethod
    def _receipt_keys_parse(cls, value: SecretStr) -> SecretStr:
        if value.get_secret_value().strip():
            ReceiptKeys.parse(value.get_secret_value())
        return value

    @cached_property
    def receipt_signing_keys(self) -> ReceiptKeys:
        return ReceiptKeys.parse(self.receipt_keys.get_secret_value().strip() or DEV_RECEIPT_KEYS)

    @property
    def sandbox_active(self) -> bool:
        return self.dev_mode if self.sandbox_enabled is None else self.sandbox_enabled

    def missing_for_production(self, *, redis: bool = True) -> list[str]:
        """The variables still on a dev default (none in dev mode): a process outside
        `cascade dev` must not start on them."""
        if self.dev_mode:
            return []
        missing = []
        if not self.database_url:
            missing.append("CASCADE_DATABASE_URL")
        if redis and not self.redis_url:
            missing.append("CASCADE_REDIS_URL")
        if self.api_key_pepper.get_secret_value() in ("", DEV_API_KEY_PEPPER):
            missing.append("CASCADE_API_KEY_PEPPER")
        if self.unsubscribe_secret.get_secret_value() in ("", DEV_UNSUBSCRIBE_SECRET):
            missing.append("CASCADE_UNSUBSCRIBE_SECRET")
        dev_secrets = set(ReceiptKeys.parse(DEV_RECEIPT_KEYS).secrets.values())
        if not self.receipt_keys.get_secret_value().strip() or any(
            secret in dev_secrets for secret in self.receipt_signing_keys.secrets.values()
        ):
            missing.append("CASCADE_RECEIPT_KEYS")
        if self.sandbox_active and self.sandbox_secret.get_secret_value() in (
            "",
            DEV_SANDBOX_SECRET,
        ):
            missing.append("CASCADE_SANDBOX_SECRET")
        return missing

    @cached_property
    def callback_base(self) -> str:
        return self.public_url.rstrip("/")


def production_refusal(missing: list[str]) -> str:
    return (
        f"refusing to start on development defaults: set {', '.join(missing)}"
        " (or CASCADE_DEV_MODE=true on a development machine; `cascade dev` does)"
    )
