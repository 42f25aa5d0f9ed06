"""Marketing policy: suppressions, quiet hours, frequency caps, unsubscribe links, STOP.

`gate_step` is what the cascade asks before it claims a step: send, defer to the end of
the recipient's quiet hours, skip a suppressed address, or suppress the whole message
over its frequency cap. Suppression applies to marketing only, except hard bounces and
complaints, which stop every category.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from typing import Any

import orjson
import phonenumbers
from sqlalchemy import (
    ARRAY,
    DateTime,
    bindparam,
    delete,
    exists,
    func,
    select,
    text,
    tuple_,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from app.cascade.machine import MessageStatus
from app.db import Transaction
from app.errors import FieldError, InvalidRequest
from app.ledger.repository import MessageRow
from app.ledger.tables import messages as ledger_messages
from app.policy.quiet_hours import next_allowed, zone
from app.policy.schemas import (
    ALL_CATEGORY_REASONS,
    FrequencyCap,
    PolicyIn,
    PolicyView,
    PreferencesIn,
    PreferencesView,
    QuietHours,
    Reason,
    SkipUnreachable,
    SuppressionView,
)
from app.policy.tables import (
    inbound_replies,
    marketing_sends,
    message_fingerprints,
    recipient_preferences,
    suppressions,
    tenant_settings,
)
from app.settings import Settings
from providers.base import Category, Channel, InboundMessage

STOP_KEYWORDS = frozenset(
    {"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "OPTOUT", "REVOKE"}
)
START_KEYWORDS = frozenset({"START", "UNSTOP", "YES"})

# Where each channel finds its addresses in a stored recipient (messenger has several).
RECIPIENT_FIELDS: Mapping[Channel, tuple[str, ...]] = {
    Channel.PUSH: ("push_token",),
    Channel.MESSENGER: ("whatsapp", "telegram_chat_id", "viber_id"),
    Channel.SMS: ("phone",),
    Channel.EMAIL: ("email",),
}


# --- addresses -------------------------------------------------------------------------


def normalise_address(channel: Channel, address: str) -> str:
    """One spelling per address: E.164 phones, lower-case emails and Telegram
    `@usernames` (Telegram ignores their case), trimmed ids.

    Raises ValueError for a phone or email that is not one.
    """
    value = address.strip()
    if channel is Channel.EMAIL:
        if value.count("@") != 1 or any(c.isspace() for c in value):
            raise ValueError("not an email address")
        return value.lower()
    if channel is Channel.MESSENGER and value.startswith("@"):
        return value.lower()
    if channel is Channel.SMS or (channel is Channel.MESSENGER and value.startswith("+")):
        try:
            number = phonenumbers.parse(value, None)
        except phonenumbers.NumberParseException:
            raise ValueError("not an E.164 phone number") from None
        return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    return value


def address_keys(recipient: Mapping[str, Any], channels: Iterable[Channel]) -> list[str]:
    """`channel:address` for each address the cascade's channels would use."""
    keys: set[str] = set()
    for channel in channels:
        for name in RECIPIENT_FIELDS[channel]:
            value = recipient.get(name)
            if isinstance(value, str) and value:
                try:
                    keys.add(f"{channel.value}:{normalise_address(channel, value)}")
                except ValueError:
                    continue
    if Channel.PUSH in channels and isinstance(recipient.get("web_push"), Mapping):
        keys.add(f"push:{recipient['web_push'].get('endpoint', '')}")
    return sorted(keys)


# --- suppressions ----------------------------------------------------------------------


async def suppress(
    tx: Transaction,
    tenant_id: uuid.UUID,
    channel: Channel | str,
    address: str,
    reason: Reason | str,
    *,
    source: str = "api",
    at: datetime | None = None,
) -> bool:
    """Suppress an address (idempotent); returns whether anything changed.

    An existing entry keeps its reason unless the new one suppresses more (a hard bounce
    or complaint on an unsubscribed address applies to every category from then on).
    Provider bounce and complaint handling calls this.
    """
    channel, reason = Channel(channel), Reason(reason)
    statement = pg_insert(suppressions).values(
        tenant_id=tenant_id,
        channel=channel.value,
        address=normalise_address(channel, address),
        reason=reason.value,
        source=source,
        created_at=at or func.now(),
    )
    wider = [r.value for r in ALL_CATEGORY_REASONS]
    upsert = statement.on_conflict_do_update(
        index_elements=["tenant_id", "channel", "address"],
        set_={"reason": statement.excluded.reason, "source": statement.excluded.source},
        where=suppressions.c.reason.not_in(wider) & statement.excluded.reason.in_(wider),
    ).returning(suppressions.c.address)
    return (await tx.conn.execute(upsert)).first() is not None


async def unsuppress(
    tx: Transaction,
    tenant_id: uuid.UUID,
    channel: Channel,
    address: str,
    only: Iterable[Reason] | None = None,
) -> bool:
    statement = delete(suppressions).where(
        suppressions.c.tenant_id == tenant_id,
        suppressions.c.channel == channel.value,
        suppressions.c.address == normalise_address(channel, address),
    )
    if only is not None:
        statement = statement.where(suppressions.c.reason.in_([r.value for r in only]))
    result = await tx.conn.execute(statement.returning(suppressions.c.address))
    return result.first() is not None


def _view(row: Any) -> SuppressionView:
    return SuppressionView(
        channel=row.channel,
        address=row.address,
        reason=row.reason,
        source=row.source,
        applies_to="all" if Reason(row.reason) in ALL_CATEGORY_REASONS else "marketing",
        created_at=row.created_at,
    )


async def get_suppression(
    conn: AsyncConnection, tenant_id: uuid.UUID, channel: Channel, address: str
) -> SuppressionView | None:
    row = (
        await conn.execute(
            select(suppressions).where(
                suppressions.c.tenant_id == tenant_id,
                suppressions.c.channel == channel.value,
                suppressions.c.address == normalise_address(channel, address),
            )
        )
    ).first()
    return _view(row) if row else None


async def list_suppressions(
    conn: AsyncConnection,
    tenant_id: uuid.UUID,
    *,
    channel: Channel | None,
    limit: int,
    after: tuple[str, str] | None,
) -> list[SuppressionView]:
    query = select(suppressions).where(suppressions.c.tenant_id == tenant_id)
    if channel is not None:
        query = query.where(suppressions.c.channel == channel.value)
    if after is not None:
        query = query.where(tuple_(suppressions.c.channel, suppressions.c.address) > after)
    query = query.order_by(suppressions.c.channel, suppressions.c.address).limit(limit)
    return [_view(row) for row in await conn.execute(query)]


# Checked before every send: built once (a statement built per call costs more CPU to
# construct and cache-key than to run).
_SUPPRESSION_REASON = select(suppressions.c.reason).where(
    suppressions.c.tenant_id == bindparam("tenant_id"),
    suppressions.c.channel == bindparam("channel"),
    suppressions.c.address == bindparam("address"),
)


async def blocking_suppression(
    conn: AsyncConnection,
    tenant_id: uuid.UUID,
    category: Category,
    channel: Channel,
    address: str,
    known: Prefetched | None = None,
) -> Reason | None:
    """The suppression that stops this send, if any (`known`: looked up for a whole batch)."""
    given = (tenant_id, channel.value, address)
    if known is not None and given in known.suppressions:
        found = known.suppressions[given]
    else:
        try:
            normalised = normalise_address(channel, address)
        except ValueError:
            return None
        row = (
            await conn.execute(
                _SUPPRESSION_REASON,
                {"tenant_id": tenant_id, "channel": channel.value, "address": normalised},
            )
        ).first()
        found = row.reason if row is not None else None
    if found is None:
        return None
    reason = Reason(found)
    return reason if category is Category.MARKETING or reason in ALL_CATEGORY_REASONS else None


# (tenant, channel, address): the address as a step uses it, or normalised.
SuppressionKey = tuple[uuid.UUID, str, str]


@dataclass(frozen=True, slots=True)
class Prefetched:
    """What `gate_step` reads, looked up for a whole batch of sends in two queries instead
    of several per message, each by the send's address as the step gives it: the address
    normalised (None: not an address that can be), its suppression reason (None: none),
    its failures since its last success (`address_health`), and the tenants' policies."""

    addresses: Mapping[SuppressionKey, str | None] = field(default_factory=dict)
    suppressions: Mapping[SuppressionKey, str | None] = field(default_factory=dict)
    failures: Mapping[SuppressionKey, list[datetime]] = field(default_factory=dict)
    policies: Mapping[uuid.UUID, TenantPolicy] = field(default_factory=dict)
    # (tenant, preference key) -> that address's preferences; every key looked up is here
    # (None: none set), so a recipient absent from it was not looked up.
    preferences: Mapping[tuple[uuid.UUID, str], Preferences | None] = field(default_factory=dict)


# Suppressions (kind 's') and address health (kind 'h') of the batch's addresses, and the
# preferences (kind 'p') of its recipients, in one round trip.
_ADDRESSES_OF = text(
    "WITH k AS (SELECT * FROM unnest(CAST(:tenants AS uuid[]), CAST(:channels AS text[]),"
    " CAST(:addresses AS text[])) AS k(tenant_id, channel, address)),"
    " q AS (SELECT * FROM unnest(CAST(:people AS uuid[]), CAST(:keys AS text[]))"
    " AS q(tenant_id, address_key))"
    " SELECT 's' AS kind, s.tenant_id, s.channel, s.address, s.reason,"
    " NULL::timestamptz[] AS failed_at, NULL::timestamptz AS at FROM suppressions s JOIN k"
    " ON s.tenant_id = k.tenant_id AND s.channel = k.channel AND s.address = k.address"
    " UNION ALL"
    " SELECT 'h', h.tenant_id, h.channel, h.address, NULL, h.failed_at, NULL::timestamptz"
    " FROM address_health h JOIN k"
    " ON h.tenant_id = k.tenant_id AND h.channel = k.channel AND h.address = k.address"
    " UNION ALL"
    " SELECT 'p', p.tenant_id, p.preferred_channel, p.address_key, p.opt_out::text,"
    " NULL::timestamptz[],"
    " p.updated_at FROM recipient_preferences p JOIN q"
    " ON p.tenant_id = q.tenant_id AND p.address_key = q.address_key"
).columns(failed_at=ARRAY(DateTime(timezone=True)), at=DateTime(timezone=True))


async def prefetch(
    conn: AsyncConnection,
    sends: Iterable[tuple[uuid.UUID, Category, Channel, str]],
    settings: Settings,
    people: Iterable[tuple[uuid.UUID, list[str]]] = (),
) -> Prefetched:
    """Look up, for these (tenant, category, channel, address) sends, what `gate_step`
    will ask about them (each address normalised once, here), and the preferences of
    these (tenant, preference keys) recipients."""
    wanted = sorted({(tenant_id, key) for tenant_id, keys in people for key in keys})
    normalised: dict[SuppressionKey, SuppressionKey | None] = {}
    tenants: set[uuid.UUID] = set()
    for tenant_id, _category, channel, address in sends:
        try:
            normalised[(tenant_id, channel.value, address)] = (
                tenant_id,
                channel.value,
                normalise_address(channel, address),
            )
        except ValueError:
            normalised[(tenant_id, channel.value, address)] = None
        tenants.add(tenant_id)
    keys = list({key for key in normalised.values() if key is not None})
    reasons: dict[SuppressionKey, str] = {}
    failed: dict[SuppressionKey, list[datetime]] = {}
    preferences: dict[tuple[uuid.UUID, str], Preferences | None] = dict.fromkeys(wanted)
    if keys or wanted:
        rows = await conn.execute(
            _ADDRESSES_OF,
            {
                "tenants": [k[0] for k in keys],
                "channels": [k[1] for k in keys],
                "addresses": [k[2] for k in keys],
                "people": [w[0] for w in wanted],
                "keys": [w[1] for w in wanted],
            },
        )
        for r in rows:
            if r.kind == "s":
                reasons[(r.tenant_id, r.channel, r.address)] = r.reason
            elif r.kind == "h":
                failed[(r.tenant_id, r.channel, r.address)] = list(r.failed_at)
            else:  # its opt-outs as JSON text, its preferred channel in `channel`
                preferences[(r.tenant_id, r.address)] = _preferences(
                    orjson.loads(r.reason), r.channel, r.at
                )
    return Prefetched(
        addresses={given: key[2] if key else None for given, key in normalised.items()},
        suppressions={
            given: reasons.get(key) if key else None for given, key in normalised.items()
        },
        failures={given: failed[key] for given, key in normalised.items() if key in failed},
        policies=await tenant_policies(conn, tenants, settings) if tenants else {},
        preferences=preferences,
    )


def unreachable_since(
    failures: list[datetime], rule: tuple[int, timedelta] | None, at: datetime
) -> datetime | None:
    """When the address's run of failures that makes it unreachable began (the earliest of
    the latest `after` failures, all inside the window), or None when it is not."""
    if rule is None:
        return None
    after, window = rule
    if len(failures) < after or failures[-after] < at - window:
        return None
    return failures[-after]


# --- tenant policy ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TenantPolicy:
    timezone: str
    locale: str
    quiet_hours: tuple[time, time] | None = None
    frequency_cap: tuple[int, timedelta] | None = None
    updated_at: datetime | None = None
    skip_unreachable: tuple[int, timedelta] | None = None  # after failures, within
    dedupe_window: timedelta | None = None


async def tenant_policy(
    conn: AsyncConnection, tenant_id: uuid.UUID, settings: Settings
) -> TenantPolicy:
    return (await tenant_policies(conn, [tenant_id], settings))[tenant_id]


async def tenant_policies(
    conn: AsyncConnection, tenant_ids: Iterable[uuid.UUID], settings: Settings
) -> dict[uuid.UUID, TenantPolicy]:
    """These tenants' policies, in one query (the default for a tenant that set none)."""
    wanted = list(set(tenant_ids))
    found = {
        row.tenant_id: _policy(row)
        for row in await conn.execute(
            select(tenant_settings).where(tenant_settings.c.tenant_id.in_(wanted))
        )
    }
    default = TenantPolicy(settings.default_timezone, settings.default_locale)
    return {t: found.get(t, default) for t in wanted}


def _policy(row: Any) -> TenantPolicy:
    return TenantPolicy(
        timezone=row.timezone,
        locale=row.locale,
        quiet_hours=(
            (row.quiet_hours_start, row.quiet_hours_end) if row.quiet_hours_start else None
        ),
        frequency_cap=(
            (row.frequency_cap, timedelta(seconds=row.frequency_window_seconds))
            if row.frequency_cap
            else None
        ),
        updated_at=row.updated_at,
        skip_unreachable=(
            (row.skip_unreachable_after, timedelta(seconds=row.skip_unreachable_window_seconds))
            if row.skip_unreachable_after
            else None
        ),
        dedupe_window=(
            timedelta(seconds=row.dedupe_window_seconds) if row.dedupe_window_seconds else None
        ),
    )


def policy_view(policy: TenantPolicy) -> PolicyView:
    return PolicyView(
        timezone=policy.timezone,
        locale=policy.locale,
        quiet_hours=(
            QuietHours(start=policy.quiet_hours[0], end=policy.quiet_hours[1])
            if policy.quiet_hours
            else None
        ),
        frequency_cap=(
            FrequencyCap(
                limit=policy.frequency_cap[0],
                window_seconds=int(policy.frequency_cap[1].total_seconds()),
            )
            if policy.frequency_cap
            else None
        ),
        skip_unreachable=(
            SkipUnreachable(
                after_failures=policy.skip_unreachable[0],
                window_seconds=int(policy.skip_unreachable[1].total_seconds()),
            )
            if policy.skip_unreachable
            else None
        ),
        dedupe_window=(int(policy.dedupe_window.total_seconds()) if policy.dedupe_window else None),
        updated_at=policy.updated_at,
    )


async def save_tenant_policy(
    tx: Transaction, tenant_id: uuid.UUID, policy: PolicyIn, settings: Settings, at: datetime
) -> PolicyView:
    cap, skip = policy.frequency_cap, policy.skip_unreachable
    if cap and timedelta(seconds=cap.window_seconds) > settings.marketing_log_retention:
        raise InvalidRequest(
            errors=[
                FieldError(
                    path="body.frequency_cap.window_seconds",
                    message="longer than the marketing send log is kept"
                    f" ({int(settings.marketing_log_retention.total_seconds())} s)",
                    type="too_long",
                )
            ]
        )
    values = {
        "timezone": policy.timezone,
        "locale": policy.locale,
        "quiet_hours_start": policy.quiet_hours.start if policy.quiet_hours else None,
        "quiet_hours_end": policy.quiet_hours.end if policy.quiet_hours else None,
        "frequency_cap": cap.limit if cap else None,
        "frequency_window_seconds": cap.window_seconds if cap else None,
        "skip_unreachable_after": skip.after_failures if skip else None,
        "skip_unreachable_window_seconds": skip.window_seconds if skip else None,
        "dedupe_window_seconds": policy.dedupe_window,
        "updated_at": at,
    }
    statement = pg_insert(tenant_settings).values(tenant_id=tenant_id, **values)
    await tx.conn.execute(
        statement.on_conflict_do_update(index_elements=["tenant_id"], set_=values)
    )
    return PolicyView(**policy.model_dump(), updated_at=at)


# --- the gate before each step ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Proceed:
    pass


@dataclass(frozen=True, slots=True)
class Defer:
    until: datetime
    reason: str


@dataclass(frozen=True, slots=True)
class SkipStep:
    reason: Reason


@dataclass(frozen=True, slots=True)
class SuppressMessage:
    reason: str
    duplicate_of: uuid.UUID | None = None


@dataclass(frozen=True, slots=True)
class Unreachable:
    """The address failed its last `failures` attempts on this channel, since `since`."""

    failures: int
    since: datetime


@dataclass(frozen=True, slots=True)
class OptedOut:
    """The person opted out of this channel for this category (their preferences)."""


Verdict = Proceed | Defer | SkipStep | SuppressMessage | Unreachable | OptedOut
PROCEED = Proceed()


async def gate_step(
    tx: Transaction,
    message: MessageRow,
    channel: Channel,
    address: str,
    *,
    first_send: bool,
    settings: Settings,
    at: datetime,
    known: Prefetched | None = None,
) -> Verdict:
    """What policy says about sending this step now (`first_send`: no earlier step of the
    message reached a provider, so this one counts against the frequency cap; `known`:
    the batch's lookups, see `prefetch`)."""
    category = Category(message.category)
    reason = await blocking_suppression(
        tx.conn, message.tenant_id, category, channel, address, known
    )
    if reason is not None:
        return SkipStep(reason)
    prefs = await preferences_for(tx.conn, message, known)
    if prefs is not None and prefs.opted_out(category, channel):
        return OptedOut()
    policy = known.policies.get(message.tenant_id) if known is not None else None
    if policy is None:
        policy = await tenant_policy(tx.conn, message.tenant_id, settings)
    if policy.skip_unreachable is not None and known is not None:
        failures = known.failures.get((message.tenant_id, channel.value, address), [])
        since = unreachable_since(failures, policy.skip_unreachable, at)
        if since is not None:
            return Unreachable(policy.skip_unreachable[0], since)
    if first_send and policy.dedupe_window is not None:
        original = await find_duplicate(tx, message, policy.dedupe_window, at)
        if original is not None:
            return SuppressMessage("duplicate", duplicate_of=original)
    if category is not Category.MARKETING:
        return PROCEED
    if policy.quiet_hours is not None:
        time_zone = message.recipient.get("timezone") or policy.timezone
        until = next_allowed(at, zone(time_zone), *policy.quiet_hours)
        if until is not None:
            return Defer(until, "quiet_hours")
    if first_send:
        channels = [Channel(step["channel"]) for step in message.cascade]
        keys = address_keys(message.recipient, channels)
        if not await record_marketing_send(
            tx, message.tenant_id, message.id, keys, policy.frequency_cap, at
        ):
            return SuppressMessage("frequency_cap")
    return PROCEED


async def _lock_addresses(tx: Transaction, tenant_id: uuid.UUID, keys: Iterable[str]) -> None:
    """Transaction-scoped advisory locks on the tenant's addresses, in sorted order (two
    sends to shared addresses never deadlock on them): frequency caps and duplicates are
    decided for one address at a time."""
    for key in sorted(keys):
        await tx.conn.execute(
            text("SELECT pg_advisory_xact_lock(:id)"), {"id": _lock_id(tenant_id, key)}
        )


def _lock_id(tenant_id: uuid.UUID, key: str) -> int:
    digest = hashlib.sha256(tenant_id.bytes + key.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


async def record_marketing_send(
    tx: Transaction,
    tenant_id: uuid.UUID,
    message_id: uuid.UUID,
    keys: list[str],
    cap: tuple[int, timedelta] | None,
    at: datetime,
) -> bool:
    """Count this message against each of the recipient's addresses; False (and nothing
    recorded) when any of them already had `cap` marketing messages in the window.

    Concurrent sends to a shared address serialise on a transaction-scoped advisory lock
    per address, taken in sorted order (no deadlocks), so two can never both take the
    last slot; the count and the insert commit or roll back with the send itself.
    """
    if not keys:
        return True
    if cap is not None:
        limit, window = cap
        await _lock_addresses(tx, tenant_id, keys)
        sent = (
            await tx.conn.execute(
                select(func.count(func.distinct(marketing_sends.c.message_id))).where(
                    marketing_sends.c.tenant_id == tenant_id,
                    marketing_sends.c.address_key.in_(keys),
                    marketing_sends.c.at > at - window,
                    marketing_sends.c.message_id != message_id,
                )
            )
        ).scalar_one()
        if sent >= limit:
            return False
    await tx.conn.execute(
        pg_insert(marketing_sends)
        .values(
            [
                {"tenant_id": tenant_id, "address_key": k, "message_id": message_id, "at": at}
                for k in keys
            ]
        )
        .on_conflict_do_nothing()
    )
    return True


async def prune_marketing_sends(tx: Transaction, before: datetime) -> int:
    result = await tx.conn.execute(delete(marketing_sends).where(marketing_sends.c.at < before))
    return int(result.rowcount)


# --- duplicates across channels --------------------------------------------------------

# The longest `dedupe_window` a policy may set: fingerprints older than this are pruned.
MAX_DEDUPE_WINDOW = timedelta(days=7)
_GIVEN_UP = [
    s.value
    for s in (
        MessageStatus.FAILED,
        MessageStatus.EXPIRED,
        MessageStatus.CANCELLED,
        MessageStatus.SUPPRESSED,
    )
]


def content_hash(content: Mapping[str, Any]) -> str:
    """The message's rendered content, as one value: equal content, equal hash."""
    return hashlib.sha256(orjson.dumps(content, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]


async def find_duplicate(
    tx: Transaction, message: MessageRow, window: timedelta, at: datetime
) -> uuid.UUID | None:
    """An earlier message with the same content to any address this one shares, sent
    within `window` and not given up on (failed, expired, cancelled, suppressed: the
    recipient did not get it), or None; then this one is recorded as sent for the next.

    Like the frequency cap, concurrent sends to a shared address serialise on advisory
    locks per address, so two identical messages never both go out."""
    # The person's addresses, whichever field or channel carries them (`phone` and
    # `whatsapp` are one number), as preferences key them.
    keys = recipient_keys(message.recipient)
    if not keys:
        return None
    digest = content_hash(message.content)
    await _lock_addresses(tx, message.tenant_id, keys)
    f = message_fingerprints.c
    original = (
        await tx.conn.execute(
            select(f.message_id)
            .join(ledger_messages, ledger_messages.c.id == f.message_id)
            .where(
                f.tenant_id == message.tenant_id,
                f.address_key.in_(keys),
                f.content_hash == digest,
                f.at > at - window,
                f.message_id != message.id,
                ledger_messages.c.status.not_in(_GIVEN_UP),
            )
            .order_by(f.at)
            .limit(1)
        )
    ).scalar_one_or_none()
    if original is not None:
        return uuid.UUID(str(original))
    await tx.conn.execute(
        pg_insert(message_fingerprints)
        .values(
            [
                {
                    "tenant_id": message.tenant_id,
                    "address_key": k,
                    "content_hash": digest,
                    "message_id": message.id,
                    "at": at,
                }
                for k in keys
            ]
        )
        .on_conflict_do_nothing()
    )
    return None


async def prune_fingerprints(tx: Transaction, before: datetime) -> int:
    result = await tx.conn.execute(
        delete(message_fingerprints).where(message_fingerprints.c.at < before)
    )
    return int(result.rowcount)


# --- unsubscribe links and replies -----------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(value: str) -> bytes:
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


def unsubscribe_token(secret: str, tenant_id: uuid.UUID, channel: Channel, address: str) -> str:
    """`<payload>.<signature>`: the tenant, channel and address, HMAC-SHA256 signed."""
    payload = _b64(f"{tenant_id.hex}\n{channel.value}\n{address}".encode())
    signature = hmac.new(secret.encode(), payload.encode(), hashlib.sha256).digest()[:16]
    return f"{payload}.{_b64(signature)}"


def read_unsubscribe_token(secret: str, token: str) -> tuple[uuid.UUID, Channel, str] | None:
    payload, _, signature = token.rpartition(".")
    expected = hmac.new(secret.encode(), payload.encode(), hashlib.sha256).digest()[:16]
    try:
        if not hmac.compare_digest(_unb64(signature), expected):
            return None
        tenant, channel, address = _unb64(payload).decode().split("\n", 2)
        return uuid.UUID(hex=tenant), Channel(channel), address
    except ValueError:  # bad base64, UTF-8, UUID or channel
        return None


def unsubscribe_headers(settings: Settings, tenant_id: uuid.UUID, address: str) -> dict[str, str]:
    """RFC 8058 one-click unsubscribe headers for a marketing email."""
    token = unsubscribe_token(
        settings.unsubscribe_secret.get_secret_value(), tenant_id, Channel.EMAIL, address
    )
    return {
        "List-Unsubscribe": f"<{settings.callback_base}/v1/unsubscribe/{token}>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
    }


async def record_reply(
    tx: Transaction,
    provider: str,
    inbound: InboundMessage,
    address: str,
    stop: bool,
    at: datetime,
) -> bool:
    """Record a STOP/START reply; whether to apply it: False for a replay of one recorded
    before, or for one sent before the latest recorded for the address."""
    # No reply was sent after it arrived: a provider clock ahead of ours must not make one
    # outrank every later reply.
    said_at = min(inbound.sent_at, at) if inbound.sent_at is not None else at
    # One address's replies are decided one at a time, so two racing ones see each other.
    lock_key = f"inbound:{inbound.channel.value}:{address}"
    lock = int.from_bytes(hashlib.sha256(lock_key.encode()).digest()[:8], "big", signed=True)
    await tx.conn.execute(select(func.pg_advisory_xact_lock(lock)))
    recorded = await tx.conn.execute(
        pg_insert(inbound_replies)
        .values(
            provider=provider,
            event_id=inbound.event_id,
            channel=inbound.channel.value,
            address=address,
            keyword="stop" if stop else "start",
            said_at=said_at,
            received_at=at,
        )
        .on_conflict_do_nothing(index_elements=["provider", "event_id"])
        .returning(inbound_replies.c.event_id)
    )
    if recorded.first() is None:
        return False
    newer = await tx.conn.scalar(
        select(
            exists().where(
                inbound_replies.c.channel == inbound.channel.value,
                inbound_replies.c.address == address,
                inbound_replies.c.said_at > said_at,
            )
        )
    )
    return not newer


def keyword(text_: str) -> str:
    return text_.strip().strip(".!").upper()


async def apply_inbound(
    tx: Transaction, provider: str, inbound: InboundMessage, settings: Settings, at: datetime
) -> int:
    """A `STOP` reply suppresses the sender for marketing, a `START` lifts that, for each
    tenant that sent it marketing lately; returns how many tenants it changed.

    Provider accounts are shared between tenants, so the reply is matched to the tenants
    whose marketing reached that address within `marketing_log_retention`. Each reply
    applies once (a replay of its event id changes nothing) and only if it is the
    address's latest by the provider's clock (else by arrival): `record_reply`.
    """
    word = keyword(inbound.text)
    if word not in STOP_KEYWORDS | START_KEYWORDS:
        return 0
    try:
        address = normalise_address(inbound.channel, inbound.sender)
    except ValueError:
        return 0
    if not await record_reply(tx, provider, inbound, address, word in STOP_KEYWORDS, at):
        return 0
    tenants = (
        await tx.conn.execute(
            select(marketing_sends.c.tenant_id)
            .where(
                marketing_sends.c.address_key == f"{inbound.channel.value}:{address}",
                marketing_sends.c.at >= at - settings.marketing_log_retention,
            )
            .distinct()
        )
    ).scalars()
    changed = 0
    for tenant_id in tenants:
        if word in STOP_KEYWORDS:
            changed += await suppress(
                tx,
                tenant_id,
                inbound.channel,
                address,
                Reason.UNSUBSCRIBED,
                source="inbound",
                at=at,
            )
        else:
            changed += await unsuppress(
                tx, tenant_id, inbound.channel, address, only=[Reason.UNSUBSCRIBED]
            )
    return changed


# --- recipient preferences -------------------------------------------------------------


def address_key(address: str) -> str:
    """The key a person's preferences are kept under, from any one of their addresses:
    `phone:<E.164>` (SMS and WhatsApp), `email:<lower-case>`, else `id:<as given>` (push
    token, Telegram chat id or `@username`, Viber id). Raises ValueError for a `+…` that
    is not a phone number."""
    value = address.strip()
    if value.startswith("+"):
        return "phone:" + normalise_address(Channel.SMS, value)
    if "@" in value and not value.startswith("@"):
        return "email:" + normalise_address(Channel.EMAIL, value)
    if value.startswith("@"):
        return "id:" + value.lower()
    return "id:" + value


def recipient_keys(recipient: Mapping[str, Any]) -> list[str]:
    """The preference keys of every address a stored recipient carries (its phones are
    E.164 already, as accepted: no parsing here, the delivery engine asks for every
    message)."""
    keys: set[str] = set()
    for name in ("phone", "whatsapp"):
        value = recipient.get(name)
        if isinstance(value, str) and value.startswith("+"):
            keys.add("phone:" + value)
    email = recipient.get("email")
    if isinstance(email, str) and email:
        keys.add("email:" + email.lower())
    for name in ("push_token", "telegram_chat_id", "viber_id"):
        value = recipient.get(name)
        if isinstance(value, str) and value:
            keys.add("id:" + (value.lower() if value.startswith("@") else value))
    return sorted(keys)


@dataclass(frozen=True, slots=True)
class Preferences:
    opt_out: Mapping[str, frozenset[str]]  # category -> channels
    preferred_channel: str | None
    updated_at: datetime

    def opted_out(self, category: Category, channel: Channel) -> bool:
        return channel.value in self.opt_out.get(category.value, frozenset())


def merge_preferences(found: Iterable[Preferences]) -> Preferences | None:
    """One person's preferences from those of their addresses: every opt-out counts; the
    preferred channel is the most recently set one."""
    ordered = sorted(found, key=lambda p: p.updated_at)
    if not ordered:
        return None
    opt_out: dict[str, frozenset[str]] = {}
    for p in ordered:
        for category, channels in p.opt_out.items():
            opt_out[category] = opt_out.get(category, frozenset()) | channels
    preferred = next((p.preferred_channel for p in reversed(ordered) if p.preferred_channel), None)
    return Preferences(opt_out, preferred, ordered[-1].updated_at)


def _preferences(
    opt_out: Mapping[str, Iterable[str]] | None, preferred: str | None, updated_at: datetime
) -> Preferences:
    return Preferences({c: frozenset(v) for c, v in (opt_out or {}).items()}, preferred, updated_at)


async def preferences_of(
    conn: AsyncConnection, tenant_id: uuid.UUID, keys: Sequence[str]
) -> Preferences | None:
    p = recipient_preferences.c
    rows = await conn.execute(
        select(recipient_preferences).where(p.tenant_id == tenant_id, p.address_key.in_(keys))
    )
    return merge_preferences(
        _preferences(r.opt_out, r.preferred_channel, r.updated_at) for r in rows
    )


def _preferences_view(key: str, prefs: Preferences) -> PreferencesView:
    return PreferencesView(
        address_key=key,
        opt_out={Category(c): sorted(Channel(ch) for ch in v) for c, v in prefs.opt_out.items()},
        preferred_channel=Channel(prefs.preferred_channel) if prefs.preferred_channel else None,
        updated_at=prefs.updated_at,
    )


async def save_preferences(
    tx: Transaction, tenant_id: uuid.UUID, key: str, body: PreferencesIn, at: datetime
) -> PreferencesView:
    values = {
        "opt_out": {c.value: sorted({ch.value for ch in v}) for c, v in body.opt_out.items() if v},
        "preferred_channel": body.preferred_channel.value if body.preferred_channel else None,
        "updated_at": at,
    }
    statement = pg_insert(recipient_preferences).values(
        tenant_id=tenant_id, address_key=key, **values
    )
    await tx.conn.execute(
        statement.on_conflict_do_update(index_elements=["tenant_id", "address_key"], set_=values)
    )
    saved = await preferences_of(tx.conn, tenant_id, [key])
    assert saved is not None
    return _preferences_view(key, saved)


async def get_preferences(
    conn: AsyncConnection, tenant_id: uuid.UUID, key: str
) -> PreferencesView | None:
    found = await preferences_of(conn, tenant_id, [key])
    return _preferences_view(key, found) if found is not None else None


async def delete_preferences(tx: Transaction, tenant_id: uuid.UUID, key: str) -> bool:
    p = recipient_preferences.c
    result = await tx.conn.execute(
        delete(recipient_preferences).where(p.tenant_id == tenant_id, p.address_key == key)
    )
    return bool(result.rowcount)


async def preferences_for(
    conn: AsyncConnection, message: MessageRow, known: Prefetched | None = None
) -> Preferences | None:
    """The message's recipient's preferences (from the batch's lookups where it has them)."""
    keys = recipient_keys(message.recipient)
    if not keys:
        return None
    if known is not None and all((message.tenant_id, k) in known.preferences for k in keys):
        found = (known.preferences[(message.tenant_id, k)] for k in keys)
        return merge_preferences(p for p in found if p is not None)
    return await preferences_of(conn, message.tenant_id, keys)


def reordered(
    cascade: Sequence[Mapping[str, Any]], prefs: Preferences | None, category: Category
) -> list[dict[str, Any]] | None:
    """The cascade with the person's preferred channel's first step moved to the front, or
    None when nothing moves (no preference, not in the cascade, already first, opted out)."""
    if prefs is None or prefs.preferred_channel is None:
        return None
    if prefs.opted_out(category, Channel(prefs.preferred_channel)):
        return None
    index = next(
        (i for i, step in enumerate(cascade) if step["channel"] == prefs.preferred_channel), None
    )
    if not index:
        return None
    steps = [dict(step) for step in cascade]
    return [steps[index], *steps[:index], *steps[index + 1 :]]
