"""SMPP 3.4 SMS adapter: one bound transceiver session, submits and receipts on it.

The provider keeps one `bind_transceiver` session to the SMSC. It binds on the first
send (or on `start()`), sends `enquire_link` every `enquire_link_interval` and answers
the SMSC's, keeps at most `window_size` submits waiting for their response (matched by
sequence number), and re-binds with exponential backoff after a drop, so receipts the
SMSC queued meanwhile still arrive.

`send()` is `submit_sm` -> `submit_sm_resp`. Its `command_status`:

| outcome                                            | result                             |
|----------------------------------------------------|------------------------------------|
| 0x00 ESME_ROK with a message_id                    | `Accepted(message_id)`             |
| 0x58 THROTTLED, 0x14 MSGQFUL, 0x08 SYSERR,         | transient `smpp:0x000000XX`        |
| 0x64 X_T_APPN, 0x04 INVBNDSTS (then re-bound)      |                                    |
| bind refused: 0x0D BINDFAIL, 0x0E INVPASWD,        | transient `smpp:0x0000000D`, …     |
| 0x0F INVSYSID, …                                   |                                    |
| TCP connect failed / bind unanswered               | transient `smpp:connect` / `:bind` |
| no response within `response_timeout`, window full | transient `smpp:timeout`           |
| connection lost while waiting                      | transient `smpp:connection_lost`   |
| any other status: 0x0B INVDSTADR, 0x0A INVSRCADR,  | `Rejected("smpp:0x000000XX")`      |
| 0x45 SUBMITFAIL, 0x61 INVSCHED, 0x62 INVEXPIRY,    |                                    |
| 0xC1 OPTPARNOTALLWD, 0xFF UNKNOWNERR, …            |                                    |

Text goes in the default alphabet when every character has a code there, otherwise as
UCS-2 (`data_coding` 8). The default alphabet is `default_data_coding`: 0 (the SMSC
default, GSM 03.38, one septet per octet), 1 (IA5/ASCII, for SMSCs whose 0 is not GSM)
or 3 (Latin-1). A text longer than one SMS (160 septets / 140 octets, 70 UCS-2
characters) goes as `long_messages` says:

- `udh` (default): split here into parts of 153 septets / 134 octets / 67 UCS-2
  characters, each a submit_sm whose short_message starts with a concatenation UDH
  (IEI 0x00, one 8-bit reference per message) and whose esm_class has UDHI (0x40). Every
  SMSC carries it: the header is part of the short message, no TLV is needed.
- `sar`: the same parts, no UDH; the `sar_msg_ref_num` (16-bit), `sar_total_segments`
  and `sar_segment_seqnum` TLVs tell the SMSC how to join them.
- `message_payload`: the text whole in the `message_payload` TLV; the SMSC splits it.
  An SMSC without TLV support answers 0xC1 and the step falls over.

Parts are cut between characters, never inside a GSM escape or a UTF-16 surrogate pair,
and submitted in order on the bound session; the reference is derived from the attempt
id and the try, so a retry never mixes with the parts of the try before. When a part is
refused (or times out) after earlier parts were accepted, those are withdrawn with
`cancel_sm` (best effort) and the send is classified by that part's answer. The attempt
is identified by the *last* part's message id, and its receipt decides: delivered when
the last part's receipt says DELIVRD (the handset shows the text once every part is
there, and the last part sent is the last to arrive). A failure receipt for an earlier
part is reported as a failure of the attempt too (the text is incomplete), which fails
it when it comes first, as it usually does; the earlier parts' DELIVRD/ACCEPTD receipts
are answered and dropped. Only the last part's id is stored, so a receipt another
process handles matches the attempt only for that part.
`Accepted.segments` is the number of SMS the text takes (with `message_payload`, as
many as the SMSC is expected to send).

`cancel(message_id)` (a withdrawn send) sends `cancel_sm` for each part with the
service_type, source and destination they were submitted with, which the provider
remembers for its recent submits. For a message this process did not submit it cancels
the given id with the default sender and a NULL destination (§4.9.1 allows it with a
message_id): another category's sender, or the earlier parts of a long message, are
then not reached.

A `deliver_sm` without those bits is a mobile-originated message (a reply, e.g. STOP):
passed to `on_inbound` as an `InboundMessage` (`mobile_originated`), answered like a
receipt. It names no message id, so its event id is a digest of its content and the
10-minute window it arrived in: an SMSC's redelivery inside that window is kept once,
the same text sent twice by the handset inside it too.

Receipts arrive on the session as `deliver_sm` with `esm_class & 0x04`, not over HTTP,
so `parse_status()` refuses every callback. Each receipt (TLVs `receipted_message_id`
and `message_state` win over the `id:… stat:… err:…` text) becomes a `StatusUpdate`
passed to `on_status`; the `deliver_sm_resp` is sent once `on_status` has returned
(ESME_ROK) or raised (ESME_RX_T_APPN, so the SMSC delivers the receipt again):
DELIVRD -> delivered, ACCEPTD/ENROUTE -> sent, UNDELIV/EXPIRED/DELETED/REJECTD/UNKNOWN
-> failed with `smpp:{stat}` (`smpp:{stat}:{err}` when the SMSC gives a non-zero err).

The provider remembers which attempt each message id it submitted belongs to, so the
update carries the attempt id even before the worker stored the provider message id.
Ids are compared in their hex and decimal readings (SMSCs differ between
`submit_sm_resp` and receipts). A receipt that arrives while submits still wait for
their response is held until a response maps its id, at most `receipt_hold_seconds`,
then passed on with only the provider message id.

SMPP has no idempotency key (`user_message_reference` is two octets): a submit whose
response timed out may have been accepted, and its retry can send a second SMS.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, tzinfo
from typing import Literal, Self
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import pydantic
import structlog
from pydantic import SecretStr

from providers.base import (
    Accepted,
    Category,
    Channel,
    InboundMessage,
    MalformedCallback,
    OutboundMessage,
    ProviderCallback,
    ReceiptStatus,
    Recipient,
    Rejected,
    SendResult,
    StatusUpdate,
    TransientProviderError,
)
from providers.smpp_pdu import (
    MAX_PARTS,
    MAX_SEQUENCE_NUMBER,
    Bind,
    CancelSm,
    CommandId,
    CommandStatus,
    DataCoding,
    EsmClass,
    MessageIdResp,
    MessageState,
    Pdu,
    PduError,
    ShortMessage,
    Tag,
    concatenation_udh,
    decode_pdu,
    decode_text,
    encode_pdu,
    read_frame,
    split_text,
    status_name,
    tlv_c_octet_string,
    tlv_integer,
)

log = structlog.get_logger()

OnStatus = Callable[[StatusUpdate], Awaitable[None]]
OnInbound = Callable[[InboundMessage], Awaitable[None]]

TRANSIENT_STATUSES = frozenset(
    {
        CommandStatus.ESME_RTHROTTLED,
        CommandStatus.ESME_RMSGQFUL,
        CommandStatus.ESME_RSYSERR,
        CommandStatus.ESME_RINVBNDSTS,
        CommandStatus.ESME_RX_T_APPN,
    }
)

# Receipt `stat:` values (SMPP 3.4 Appendix B) and what the cascade makes of them.
RECEIPT_STATUSES: Mapping[str, ReceiptStatus] = {
    "DELIVRD": ReceiptStatus.DELIVERED,
    "ACCEPTD": ReceiptStatus.SENT,
    "ENROUTE": ReceiptStatus.SENT,
    "UNDELIV": ReceiptStatus.FAILED,
    "EXPIRED": ReceiptStatus.FAILED,
    "DELETED": ReceiptStatus.FAILED,
    "REJECTD": ReceiptStatus.FAILED,
    "UNKNOWN": ReceiptStatus.FAILED,
}
MESSAGE_STATE_STATS: Mapping[int, str] = {
    MessageState.ENROUTE: "ENROUTE",
    MessageState.DELIVERED: "DELIVRD",
    MessageState.EXPIRED: "EXPIRED",
    MessageState.DELETED: "DELETED",
    MessageState.UNDELIVERABLE: "UNDELIV",
    MessageState.ACCEPTED: "ACCEPTD",
    MessageState.UNKNOWN: "UNKNOWN",
    MessageState.REJECTED: "REJECTD",
}
RECEIPT_FIELD = re.compile(r"\b(id|sub|dlvrd|submit date|done date|stat|err|text)\s*:", re.I)

MAX_MESSAGE_PAYLOAD = 0xFFFF
MAX_RELATIVE_VALIDITY_SECONDS = 99 * 86_400 + 86_399
UNBIND_TIMEOUT_SECONDS = 2.0

TON_INTERNATIONAL, NPI_E164 = 1, 1
TON_ALPHANUMERIC, NPI_UNKNOWN = 5, 0


class SmppConfig(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(frozen=True)

    name: str = "smpp"
    host: str = pydantic.Field(min_length=1)
    port: int = pydantic.Field(default=2775, ge=1, le=65535)
    system_id: str = pydantic.Field(min_length=1, max_length=15)
    password: SecretStr
    system_type: str = pydantic.Field(default="", max_length=12)
    source_addr: str = pydantic.Field(min_length=1, max_length=20)
    source_addr_by_category: dict[Category, str] = pydantic.Field(default_factory=dict)
    # None: 1/1 (international, E.164) for digits, 5/0 (alphanumeric) otherwise.
    source_addr_ton: int | None = pydantic.Field(default=None, ge=0, le=255)
    source_addr_npi: int | None = pydantic.Field(default=None, ge=0, le=255)
    dest_addr_ton: int = pydantic.Field(default=TON_INTERNATIONAL, ge=0, le=255)
    dest_addr_npi: int = pydantic.Field(default=NPI_E164, ge=0, le=255)
    service_type: str = pydantic.Field(default="", max_length=5)
    registered_delivery: int = pydantic.Field(default=1, ge=0, le=255)
    # Relative validity_period = the step timeout, so the SMSC drops an SMS the cascade gave up on.
    validity_from_step_timeout: bool = True
    connect_timeout: float = pydantic.Field(default=10.0, gt=0)
    response_timeout: float = pydantic.Field(default=10.0, gt=0)
    enquire_link_interval: float = pydantic.Field(default=30.0, gt=0)
    window_size: int = pydantic.Field(default=10, ge=1)
    rebind_backoff_initial: float = pydantic.Field(default=1.0, gt=0)
    rebind_backoff_max: float = pydantic.Field(default=60.0, gt=0)
    receipt_hold_seconds: float = pydantic.Field(default=10.0, ge=0)
    max_held_receipts: int = pydantic.Field(default=1000, ge=0)
    remembered_submits: int = pydantic.Field(default=100_000, ge=1)
    # Which PDU carries message ids in hex when the SMSC mixes bases; ids are then reported
    # in decimal so a receipt handled by another worker still matches the stored id.
    hex_message_ids: Literal["none", "submit_sm_resp", "receipts"] = "none"
    # The SMSC's clock for the receipt's `done date`.
    receipt_timezone: str = "UTC"
    # How a text longer than one SMS goes (module docstring): UDH parts, SAR parts, or
    # whole in message_payload.
    long_messages: Literal["udh", "sar", "message_payload"] = "udh"
    # data_coding of a text in the default alphabet: 0 SMSC default (GSM 03.38), 1 IA5
    # (ASCII), 3 Latin-1. Other texts go as UCS-2 (8).
    default_data_coding: Literal[0, 1, 3] = 0

    @pydantic.field_validator("password")
    @classmethod
    def password_fits(cls, value: SecretStr) -> SecretStr:
        if len(value.get_secret_value()) > 8:
            raise ValueError("an SMPP 3.4 password is at most 8 characters")
        return value

    @pydantic.model_validator(mode="after")
    def senders_fit(self) -> Self:
        for sender in (self.source_addr, *self.source_addr_by_category.values()):
            if not sender or len(sender) > 20:
                raise ValueError(f"source address {sender!r} must be 1-20 characters")
            if not sender.lstrip("+").isdigit() and len(sender) > 11:
                raise ValueError(f"alphanumeric sender {sender!r} is longer than 11 characters")
        try:
            time_zone(self.receipt_timezone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown receipt_timezone {self.receipt_timezone!r}") from exc
        return self


def time_zone(name: str) -> tzinfo:
    # Without the tz database installed, ZoneInfo("UTC") fails; UTC needs none.
    return UTC if name.upper() == "UTC" else ZoneInfo(name)


class SmppProvider:
    channel = Channel.SMS

    def __init__(
        self,
        config: SmppConfig,
        *,
        on_status: OnStatus | None = None,
        on_inbound: OnInbound | None = None,
    ) -> None:
        self.name = config.name
        self._config = config
        self._on_status = on_status
        self._on_inbound = on_inbound
        self._session: SmppSession | None = None
        self._keep_bound_task: asyncio.Task[None] | None = None
        self._bind_state = asyncio.Condition()
        self._bind_attempts = 0
        self._bind_error: TransientProviderError | None = None
        self._bind_retry_at = 0.0
        self._submitted = SubmittedMessages(config.remembered_submits)
        self._submits_settled = asyncio.Condition()
        self._submits_in_flight = 0
        self._held_receipts = 0
        self._receipt_tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self._receipt_time_zone = time_zone(config.receipt_timezone)

    def address(self, to: Recipient) -> str | None:
        return to.phone

    async def start(self) -> None:
        """Bind now rather than on the first send, so queued receipts start to flow."""
        self._keep_bound()

    async def send(self, message: OutboundMessage) -> SendResult:
        plan = self.submits_for(message)
        if isinstance(plan, Rejected):
            return plan
        session = await self._bound_session()
        accepted: list[str] = []
        refused: Rejected | TransientProviderError | None = None
        self._submits_in_flight += 1
        try:
            for part in plan.parts:
                try:
                    outcome = await self._submit(session, part)
                except TransientProviderError as exc:
                    refused = exc
                    break
                if isinstance(outcome, Rejected):
                    refused = outcome
                    break
                accepted.append(outcome.provider_message_id)
        finally:
            # Mapped before the count drops, so a held receipt sees its attempt.
            async with self._submits_settled:
                if refused is None and len(accepted) == len(plan.parts):
                    self._remember(message.attempt_id, accepted, plan.cancel)
                self._submits_in_flight -= 1
                self._submits_settled.notify_all()
        if refused is None:
            return Accepted(self._canonical_id(accepted[-1], "submit_sm_resp"), plan.segments)
        if accepted:
            await self._withdraw(session, plan.cancel, accepted)
        if isinstance(refused, TransientProviderError):
            raise refused
        return refused

    def submits_for(self, message: OutboundMessage) -> SubmitPlan | Rejected:
        """The submit_sm PDUs for `message`, in order, or why it cannot be sent at all."""
        config = self._config
        text = message.content.text
        if not text:
            return Rejected(code="smpp:missing_body", detail="SMS needs content.text")
        destination = message.address.removeprefix("+")
        if not destination.isdigit() or len(destination) > 20:
            return Rejected(code="smpp:invalid_address", detail="not an E.164 phone number")
        data_coding, parts = split_text(text, config.default_data_coding)
        segments = len(parts)
        if config.long_messages == "message_payload" and segments > 1:
            payload = b"".join(parts)
            if len(payload) > MAX_MESSAGE_PAYLOAD:
                return Rejected(code="smpp:too_long", detail=f"{len(payload)} octets of text")
            bodies: list[tuple[int, bytes, dict[int, bytes]]] = [
                (EsmClass.DEFAULT, b"", {Tag.MESSAGE_PAYLOAD: payload})
            ]
        elif segments > MAX_PARTS:
            return Rejected(code="smpp:too_long", detail=f"{segments} parts, at most {MAX_PARTS}")
        elif segments == 1:
            bodies = [(EsmClass.DEFAULT, parts[0], {})]
        else:
            reference = concatenation_reference(message.attempt_id, message.try_number)
            bodies = [
                (EsmClass.UDH_INDICATOR, concatenation_udh(reference, segments, n) + part, {})
                if config.long_messages == "udh"
                else (EsmClass.DEFAULT, part, sar_tlvs(reference, segments, n))
                for n, part in enumerate(parts, start=1)
            ]

        sender = config.source_addr_by_category.get(message.category, config.source_addr)
        source_addr_ton, source_addr_npi, source_addr = self._source(sender)
        validity_period = (
            relative_validity_period(message.timeout_seconds)
            if config.validity_from_step_timeout
            else ""
        )
        submits = [
            ShortMessage(
                service_type=config.service_type,
                source_addr_ton=source_addr_ton,
                source_addr_npi=source_addr_npi,
                source_addr=source_addr,
                dest_addr_ton=config.dest_addr_ton,
                dest_addr_npi=config.dest_addr_npi,
                destination_addr=destination,
                esm_class=esm_class,
                validity_period=validity_period,
                registered_delivery=config.registered_delivery,
                data_coding=data_coding,
                short_message=short_message,
                tlvs=tlvs,
            )
            for esm_class, short_message, tlvs in bodies
        ]
        cancel = CancelSm(
            service_type=config.service_type,
            source_addr_ton=source_addr_ton,
            source_addr_npi=source_addr_npi,
            source_addr=source_addr,
            dest_addr_ton=config.dest_addr_ton,
            dest_addr_npi=config.dest_addr_npi,
            destination_addr=destination,
        )
        return SubmitPlan(submits, segments, cancel)

    async def cancel(self, provider_message_id: str) -> bool:
        """cancel_sm for every part of the message; True when the SMSC withdrew them all."""
        found = self._submitted.find(provider_message_id)
        if found is not None:
            part_ids, template = found.submitted.part_ids, found.submitted.cancel
        else:
            part_ids, template = (self._smsc_id(provider_message_id),), self._default_cancel()
        session = await self._bound_session()
        withdrawn = True
        for part_id in part_ids:
            response = await self._request(
                session, CommandId.CANCEL_SM, replace(template, message_id=part_id)
            )
            status = response.command_status
            if status in TRANSIENT_STATUSES:
                raise TransientProviderError(f"smpp:0x{status:08X}", status_name(status))
            if status != CommandStatus.ESME_ROK:
                log.info("smpp_cancel_refused", provider=self.name, status=status_name(status))
                withdrawn = False
        return withdrawn

    async def _submit(self, session: SmppSession, submit: ShortMessage) -> SendResult:
        """One submit_sm: Accepted with the SMSC's id as given, Rejected, or raises."""
        response = await self._request(session, CommandId.SUBMIT_SM, submit)
        return classify_submit_response(response)

    async def _request(
        self, session: SmppSession, command_id: CommandId, body: ShortMessage | CancelSm
    ) -> Pdu:
        try:
            response = await session.request(command_id, body, windowed=True)
        except ResponseTimeout as exc:
            raise TransientProviderError(
                "smpp:timeout", str(exc), maybe_sent=isinstance(exc, Unanswered)
            ) from exc
        except SessionClosed as exc:
            raise TransientProviderError(
                "smpp:connection_lost", str(exc), maybe_sent=isinstance(exc, Unanswered)
            ) from exc
        except PduError as exc:
            raise TransientProviderError("smpp:bad_response", str(exc)) from exc
        if response.command_status == CommandStatus.ESME_RINVBNDSTS:
            session.abort("the SMSC no longer sees this session as bound")
        return response

    async def _withdraw(
        self, session: SmppSession, template: CancelSm, part_ids: list[str]
    ) -> None:
        """The accepted parts of a message whose later part was not: cancel_sm, best effort."""
        for part_id in part_ids:
            try:
                response = await self._request(
                    session, CommandId.CANCEL_SM, replace(template, message_id=part_id)
                )
            except TransientProviderError as exc:
                log.warning("smpp_part_not_withdrawn", provider=self.name, error=exc.code)
                return
            log.info(
                "smpp_part_withdrawn",
                provider=self.name,
                status=status_name(response.command_status),
            )

    def _source(self, sender: str) -> tuple[int, int, str]:
        """source_addr_ton, source_addr_npi and source_addr for a sender."""
        config = self._config
        numeric = sender.lstrip("+").isdigit()
        ton, npi = (TON_INTERNATIONAL, NPI_E164) if numeric else (TON_ALPHANUMERIC, NPI_UNKNOWN)
        return (
            ton if config.source_addr_ton is None else config.source_addr_ton,
            npi if config.source_addr_npi is None else config.source_addr_npi,
            sender.lstrip("+") if numeric else sender,
        )

    def _default_cancel(self) -> CancelSm:
        ton, npi, source_addr = self._source(self._config.source_addr)
        return CancelSm(
            service_type=self._config.service_type,
            source_addr_ton=ton,
            source_addr_npi=npi,
            source_addr=source_addr,
        )

    def _smsc_id(self, provider_message_id: str) -> str:
        """The id as the SMSC gave it, undoing `_canonical_id` (case and padding unknown)."""
        if self._config.hex_message_ids == "submit_sm_resp" and provider_message_id.isdigit():
            return format(int(provider_message_id), "X")
        return provider_message_id

    async def parse_status(self, callback: ProviderCallback) -> list[StatusUpdate]:
        raise MalformedCallback(
            "SMPP receipts arrive as deliver_sm on the bound session, never over HTTP"
        )

    async def aclose(self) -> None:
        self._closing = True
        if self._keep_bound_task is not None:
            self._keep_bound_task.cancel()
            await asyncio.gather(self._keep_bound_task, return_exceptions=True)
        for task in list(self._receipt_tasks):
            task.cancel()
        await asyncio.gather(*self._receipt_tasks, return_exceptions=True)

    # -- session ---------------------------------------------------------------------

    def _keep_bound(self) -> None:
        if self._closing:
            raise TransientProviderError("smpp:closed", "the provider is shutting down")
        if self._keep_bound_task is None or self._keep_bound_task.done():
            self._keep_bound_task = asyncio.create_task(self._stay_bound())

    async def _bound_session(self) -> SmppSession:
        self._keep_bound()
        loop = asyncio.get_running_loop()
        async with self._bind_state:
            if self._session is not None and self._session.is_open:
                return self._session
            error = self._bind_error
            if error is not None and loop.time() < self._bind_retry_at:
                raise TransientProviderError(
                    error.code, error.detail, retry_after=self._bind_retry_at - loop.time()
                )
            attempts_before = self._bind_attempts
            try:
                async with asyncio.timeout(
                    self._config.connect_timeout + self._config.response_timeout
                ):
                    await self._bind_state.wait_for(lambda: self._bind_attempts > attempts_before)
            except TimeoutError:
                raise TransientProviderError("smpp:timeout", "no bound session in time") from None
            if self._session is not None:
                return self._session
            if self._bind_error is None:
                raise TransientProviderError("smpp:connection_lost", "session closed after bind")
            raise TransientProviderError(
                self._bind_error.code,
                self._bind_error.detail,
                retry_after=max(0.0, self._bind_retry_at - loop.time()),
            )

    async def _stay_bound(self) -> None:
        """Bind, wait for the session to end, bind again; back off while binds fail."""
        config = self._config
        loop = asyncio.get_running_loop()
        delay = config.rebind_backoff_initial
        while not self._closing:
            try:
                session = await SmppSession.open(config, self._receive_deliver_sm)
            except TransientProviderError as exc:
                log.warning(
                    "smpp_bind_failed", provider=self.name, code=exc.code, detail=exc.detail
                )
                async with self._bind_state:
                    self._bind_error = exc
                    self._bind_retry_at = loop.time() + delay
                    self._bind_attempts += 1
                    self._bind_state.notify_all()
                await asyncio.sleep(delay)
                delay = min(delay * 2, config.rebind_backoff_max)
                continue

            bound_at = loop.time()
            try:
                async with self._bind_state:
                    self._session = session
                    self._bind_error = None
                    self._bind_attempts += 1
                    self._bind_state.notify_all()
                log.info("smpp_bound", provider=self.name, host=config.host, port=config.port)
                await session.wait_closed()
            finally:
                self._session = None
                if session.is_open:  # cancelled by aclose(): unbind politely
                    await session.close()
            log.warning("smpp_session_closed", provider=self.name, reason=session.close_reason)
            if loop.time() - bound_at >= config.enquire_link_interval:
                delay = config.rebind_backoff_initial
                continue
            # A session that dies soon after its bind must not turn into a reconnect loop;
            # sends fail fast meanwhile instead of waiting for the next bind.
            async with self._bind_state:
                self._bind_error = TransientProviderError(
                    "smpp:connection_lost", f"{session.close_reason}; binding again"
                )
                self._bind_retry_at = loop.time() + delay
            await asyncio.sleep(delay)
            delay = min(delay * 2, config.rebind_backoff_max)

    # -- receipts --------------------------------------------------------------------

    def _remember(self, attempt_id: str, part_ids: list[str], cancel: CancelSm) -> None:
        provider_message_id = self._canonical_id(part_ids[-1], "submit_sm_resp")
        self._submitted.remember(
            Submitted(attempt_id, provider_message_id, tuple(part_ids), cancel)
        )

    def _canonical_id(self, message_id: str, source: Literal["submit_sm_resp", "receipts"]) -> str:
        if self._config.hex_message_ids == source:
            with contextlib.suppress(ValueError):
                return str(int(message_id, 16))
        return message_id

    def _receive_deliver_sm(self, session: SmppSession, pdu: Pdu) -> None:
        task = asyncio.create_task(self._answer_deliver_sm(session, pdu))
        self._receipt_tasks.add(task)
        task.add_done_callback(self._receipt_tasks.discard)

    async def _answer_deliver_sm(self, session: SmppSession, pdu: Pdu) -> None:
        status = CommandStatus.ESME_ROK
        body = pdu.body
        try:
            if isinstance(body, ShortMessage) and not body.esm_class & EsmClass.DELIVERY_RECEIPT:
                await self._receive_mobile_originated(body)
            else:
                update = await self._status_update_for(pdu)
                if update is not None and self._on_status is not None:
                    await self._on_status(update)
        except Exception:
            log.exception("smpp_deliver_sm_not_recorded", provider=self.name)
            status = CommandStatus.ESME_RX_T_APPN
        await session.respond(pdu, CommandId.DELIVER_SM_RESP, status, MessageIdResp())

    async def _receive_mobile_originated(self, body: ShortMessage) -> None:
        if self._on_inbound is None:
            log.info("smpp_mobile_originated_ignored", provider=self.name)
            return
        message = mobile_originated(body, datetime.now(UTC))
        if message is None:
            log.warning("smpp_mobile_originated_unreadable", provider=self.name)
            return
        await self._on_inbound(message)

    async def _status_update_for(self, pdu: Pdu) -> StatusUpdate | None:
        body = pdu.body
        if not isinstance(body, ShortMessage):
            return None
        receipt = parse_delivery_receipt(body)
        if receipt is None:
            log.warning("smpp_receipt_unreadable", provider=self.name)
            return None
        found = await self._submitted_for(receipt.message_id)
        if found is None:
            return status_update(
                receipt,
                provider_message_id=self._canonical_id(receipt.message_id, "receipts"),
                attempt_id=None,
                timezone=self._receipt_time_zone,
            )
        submitted = found.submitted
        if not found.decides and RECEIPT_STATUSES.get(receipt.stat) is not ReceiptStatus.FAILED:
            # The last part's receipt decides delivery; an earlier part can only fail it.
            log.debug("smpp_part_receipt", provider=self.name, part=found.index + 1)
            return None
        return status_update(
            receipt,
            provider_message_id=submitted.provider_message_id,
            attempt_id=submitted.attempt_id,
            timezone=self._receipt_time_zone,
            part_message_id=(
                None
                if found.decides
                else self._canonical_id(submitted.part_ids[found.index], "submit_sm_resp")
            ),
        )

    async def _submitted_for(self, message_id: str) -> SubmittedPart | None:
        """The submit a receipt is about; waits a little while responses are outstanding."""
        found = self._submitted.find(message_id)
        if found is not None or self._submits_in_flight == 0:
            return found
        if self._held_receipts >= self._config.max_held_receipts:
            return None
        self._held_receipts += 1
        try:
            async with self._submits_settled:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._config.receipt_hold_seconds):
                        await self._submits_settled.wait_for(
                            lambda: (
                                self._submitted.find(message_id) is not None
                                or self._submits_in_flight == 0
                            )
                        )
                return self._submitted.find(message_id)
        finally:
            self._held_receipts -= 1


def classify_submit_response(response: Pdu) -> SendResult:
    status = response.command_status
    code = f"smpp:0x{status:08X}"
    if status == CommandStatus.ESME_ROK:
        if isinstance(response.body, MessageIdResp) and response.body.message_id:
            return Accepted(provider_message_id=response.body.message_id)
        raise TransientProviderError("smpp:bad_response", "submit_sm_resp without a message_id")
    if status in TRANSIENT_STATUSES:
        raise TransientProviderError(code, status_name(status))
    return Rejected(code=code, detail=status_name(status))


def relative_validity_period(seconds: int) -> str:
    """SMPP relative time `YYMMDDhhmmss000R` (§7.1.1), capped at its 99-day maximum."""
    seconds = max(1, min(seconds, MAX_RELATIVE_VALIDITY_SECONDS))
    days, rest = divmod(seconds, 86_400)
    hours, rest = divmod(rest, 3_600)
    minutes, secs = divmod(rest, 60)
    return f"0000{days:02d}{hours:02d}{minutes:02d}{secs:02d}000R"


# -- delivery receipts ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeliveryReceipt:
    message_id: str
    stat: str
    err: str | None = None
    done_date: str | None = None
    network_error: str | None = None


def receipt_fields(text: str) -> dict[str, str]:
    """`id:… sub:… dlvrd:… submit date:… done date:… stat:… err:… text:…` as a dict."""
    matches = list(RECEIPT_FIELD.finditer(text))
    fields: dict[str, str] = {}
    for index, match in enumerate(matches):
        key = match.group(1).lower()
        if key == "text":
            # The message's first characters: anything may follow, even "stat:".
            fields[key] = text[match.end() :].strip()
            break
        end = matches[index + 1].start() if index + 1 < len(matches) else len(text)
        fields.setdefault(key, text[match.end() : end].strip())
    return fields


def parse_delivery_receipt(body: ShortMessage) -> DeliveryReceipt | None:
    raw = body.short_message or body.tlvs.get(Tag.MESSAGE_PAYLOAD, b"")
    text = (
        raw.decode("utf-16-be", errors="replace")
        if body.data_coding == DataCoding.UCS2
        else raw.decode("latin-1")
    )
    fields = receipt_fields(text)
    message_id = tlv_c_octet_string(body.tlvs, Tag.RECEIPTED_MESSAGE_ID) or fields.get("id")
    state = tlv_integer(body.tlvs, Tag.MESSAGE_STATE)
    stat = MESSAGE_STATE_STATS.get(state) if state is not None else None
    stat = stat or (fields.get("stat") or "").upper() or None
    if not message_id or not stat:
        return None
    network_error = body.tlvs.get(Tag.NETWORK_ERROR_CODE)
    return DeliveryReceipt(
        message_id=message_id.strip(),
        stat=stat,
        err=fields.get("err") or None,
        done_date=fields.get("done date") or None,
        network_error=network_error.hex() if network_error else None,
    )


# -- mobile-originated messages -------------------------------------------------------

# deliver_sm carries no id for a mobile-originated message: its redelivery (after an
# unanswered or refused deliver_sm_resp) is known by its content, within this window.
MO_REDELIVERY_WINDOW_SECONDS = 600


def mobile_originated(body: ShortMessage, received_at: datetime) -> InboundMessage | None:
    """A deliver_sm without the receipt bits: a text the handset (`source_addr`) sent to
    our number (`destination_addr`), in `short_message` or `message_payload`, decoded by
    its `data_coding`; None when it carries neither. A concatenated part's UDH is cut
    off (parts are kept as they come, not joined)."""
    raw = body.short_message or body.tlvs.get(Tag.MESSAGE_PAYLOAD, b"")
    if not raw or not body.source_addr:
        return None
    if body.esm_class & EsmClass.UDH_INDICATOR:
        raw = raw[raw[0] + 1 :]
    sender = body.source_addr.strip()
    if body.source_addr_ton == TON_INTERNATIONAL and sender.isdigit():
        sender = "+" + sender
    to = body.destination_addr.strip() or None
    window = int(received_at.timestamp()) // MO_REDELIVERY_WINDOW_SECONDS
    digest = hashlib.sha256(
        b"\n".join(
            (
                sender.encode(),
                (to or "").encode(),
                bytes((body.esm_class, body.data_coding)),
                body.short_message,
                body.tlvs.get(Tag.MESSAGE_PAYLOAD, b""),
                body.tlvs.get(Tag.USER_MESSAGE_REFERENCE, b""),
            )
        )
    ).hexdigest()[:32]
    return InboundMessage(
        channel=Channel.SMS,
        sender=sender,
        text=decode_text(body.data_coding, raw),
        event_id=f"mo:{digest}:{window}",
        to=to,
    )


def status_update(
    receipt: DeliveryReceipt,
    *,
    provider_message_id: str,
    attempt_id: str | None,
    timezone: tzinfo,
    part_message_id: str | None = None,
) -> StatusUpdate | None:
    """`part_message_id`: the receipt is about that part of a concatenated message, not
    the part whose id is the attempt's."""
    status = RECEIPT_STATUSES.get(receipt.stat)
    if status is None:
        log.info("smpp_receipt_state_ignored", stat=receipt.stat)
        return None
    error_code = error_detail = None
    if status is ReceiptStatus.FAILED:
        has_err = bool(receipt.err and receipt.err.strip("0"))
        error_code = f"smpp:{receipt.stat}:{receipt.err}" if has_err else f"smpp:{receipt.stat}"
        error_detail = f"SMSC reported {receipt.stat}"
        if has_err:
            error_detail += f", err {receipt.err}"
        if receipt.network_error:
            error_detail += f", network_error_code {receipt.network_error}"
    return StatusUpdate(
        status=status,
        event_id=f"{part_message_id or provider_message_id}:{receipt.stat}",
        provider_message_id=provider_message_id,
        attempt_id=attempt_id,
        error_code=error_code,
        error_detail=error_detail,
        occurred_at=receipt_time(receipt.done_date, timezone),
    )


def receipt_time(value: str | None, timezone: tzinfo) -> datetime | None:
    """`YYMMDDhhmm` (or with seconds, as many SMSCs send) in the SMSC's time zone."""
    if not value:
        return None
    for pattern in ("%y%m%d%H%M%S", "%y%m%d%H%M"):
        with contextlib.suppress(ValueError):
            return datetime.strptime(value, pattern).replace(tzinfo=timezone)
    return None


def message_id_forms(message_id: str) -> list[str]:
    """The id as given, then its hex and decimal readings, normalised for comparison."""
    text = message_id.strip().lower()
    forms = [text.lstrip("0") or "0"]
    if text.isdigit():
        forms.append(format(int(text), "x"))
    if text and all(c in "0123456789abcdef" for c in text):
        forms.append(str(int(text, 16)))
    return list(dict.fromkeys(forms))


@dataclass(frozen=True, slots=True)
class Submitted:
    attempt_id: str
    provider_message_id: str  # the attempt's: the last part's id, canonical
    part_ids: tuple[str, ...]  # every part's id as the SMSC gave it, in order
    cancel: CancelSm  # what cancel_sm repeats of the submit (message_id left empty)


@dataclass(frozen=True, slots=True)
class SubmittedPart:
    submitted: Submitted
    index: int

    @property
    def decides(self) -> bool:
        """Whether this part's receipt is the attempt's (the last part's)."""
        return self.index == len(self.submitted.part_ids) - 1


class SubmittedMessages:
    """message id of each part -> the attempt that submitted it, for the most recent
    `capacity` messages."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._by_form: dict[str, SubmittedPart] = {}
        self._by_id: OrderedDict[str, tuple[Submitted, list[tuple[str, SubmittedPart]]]] = (
            OrderedDict()
        )

    def remember(self, submitted: Submitted) -> None:
        key = submitted.part_ids[-1]
        self._by_id.pop(key, None)
        forms: list[tuple[str, SubmittedPart]] = []
        for index, part_id in enumerate(submitted.part_ids):
            part = SubmittedPart(submitted, index)
            for form in message_id_forms(part_id):
                self._by_form[form] = part
                forms.append((form, part))
        self._by_id[key] = (submitted, forms)
        while len(self._by_id) > self._capacity:
            _, (_, old_forms) = self._by_id.popitem(last=False)
            for form, part in old_forms:
                if self._by_form.get(form) is part:
                    del self._by_form[form]

    def find(self, message_id: str) -> SubmittedPart | None:
        # The id exactly as given first: another reading only when that one is unknown.
        for form in message_id_forms(message_id):
            found = self._by_form.get(form)
            if found is not None:
                return found
        return None


@dataclass(frozen=True, slots=True)
class SubmitPlan:
    """What `send` submits: the parts in order, the SMS count, the cancel_sm template."""

    parts: list[ShortMessage]
    segments: int
    cancel: CancelSm


def concatenation_reference(attempt_id: str, try_number: int) -> int:
    """A 16-bit reference for the parts of one try (UDH keeps its low 8 bits)."""
    digest = hashlib.blake2b(f"{attempt_id}:{try_number}".encode(), digest_size=2).digest()
    return int.from_bytes(digest, "big")


def sar_tlvs(reference: int, total: int, number: int) -> dict[int, bytes]:
    return {
        Tag.SAR_MSG_REF_NUM: reference.to_bytes(2, "big"),
        Tag.SAR_TOTAL_SEGMENTS: bytes((total,)),
        Tag.SAR_SEGMENT_SEQNUM: bytes((number,)),
    }


# -- the wire session ----------------------------------------------------------------


class SessionClosed(Exception):
    pass


class ResponseTimeout(Exception):
    pass


class Unanswered(Exception):
    """The request was written to the SMSC and no response came: it may have taken it."""


class AnswerTimeout(ResponseTimeout, Unanswered):
    pass


class ClosedWhileWaiting(SessionClosed, Unanswered):
    pass


DeliverSmHandler = Callable[["SmppSession", Pdu], None]


class SmppSession:
    """One TCP connection bound as a transceiver: requests matched to responses by
    sequence number, enquire_link both ways, deliver_sm handed to `on_deliver_sm`."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        config: SmppConfig,
        on_deliver_sm: DeliverSmHandler,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._config = config
        self._on_deliver_sm = on_deliver_sm
        self._pending: dict[int, asyncio.Future[Pdu]] = {}
        self._next_sequence = 1
        self._window = asyncio.Semaphore(config.window_size)
        self._closed = asyncio.Event()
        self.close_reason = ""
        self._reader_task = asyncio.create_task(self._read())
        self._keepalive_task: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, config: SmppConfig, on_deliver_sm: DeliverSmHandler) -> SmppSession:
        """Connect and bind_transceiver; every failure is a `TransientProviderError`."""
        try:
            async with asyncio.timeout(config.connect_timeout):
                reader, writer = await asyncio.open_connection(config.host, config.port)
        except (OSError, TimeoutError) as exc:
            raise TransientProviderError(
                "smpp:connect", f"{config.host}:{config.port}: {exc or type(exc).__name__}"
            ) from exc
        session = cls(reader, writer, config, on_deliver_sm)
        bind = Bind(
            system_id=config.system_id,
            password=config.password.get_secret_value(),
            system_type=config.system_type,
        )
        try:
            response = await session.request(CommandId.BIND_TRANSCEIVER, bind)
        except (ResponseTimeout, SessionClosed, PduError) as exc:
            await session.close(unbind=False)
            raise TransientProviderError("smpp:bind", f"bind_transceiver: {exc}") from exc
        except asyncio.CancelledError:
            session.abort("bind cancelled")
            session._reader_task.cancel()
            raise
        if (
            response.command_id != CommandId.BIND_TRANSCEIVER_RESP
            or response.command_status != CommandStatus.ESME_ROK
        ):
            await session.close(unbind=False)
            status = response.command_status
            raise TransientProviderError(
                f"smpp:0x{status:08X}", f"bind_transceiver refused: {status_name(status)}"
            )
        session._keepalive_task = asyncio.create_task(session._keep_alive())
        return session

    @property
    def is_open(self) -> bool:
        return not self._closed.is_set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def request(
        self,
        command_id: CommandId,
        body: Bind | ShortMessage | CancelSm | None = None,
        *,
        windowed: bool = False,
    ) -> Pdu:
        """Send a request and wait for its response (or a generic_nack) by sequence number."""
        if self._closed.is_set():
            raise SessionClosed(self.close_reason)
        timeout = self._config.response_timeout
        if windowed:
            try:
                async with asyncio.timeout(timeout):
                    await self._window.acquire()
            except TimeoutError:
                raise ResponseTimeout(f"window of {self._config.window_size} stayed full") from None
        try:
            sequence_number = self._allocate_sequence_number()
            response: asyncio.Future[Pdu] = asyncio.get_running_loop().create_future()
            self._pending[sequence_number] = response
            try:
                await self._write(Pdu(command_id, sequence_number, 0, body))
                try:
                    async with asyncio.timeout(timeout):
                        return await response
                except SessionClosed as exc:
                    raise ClosedWhileWaiting(str(exc)) from exc
            except TimeoutError:
                raise AnswerTimeout(
                    f"no response to {command_id.name} within {timeout:g}s"
                ) from None
            finally:
                self._pending.pop(sequence_number, None)
        finally:
            if windowed:
                self._window.release()

    async def respond(
        self, request: Pdu, command_id: CommandId, status: int, body: MessageIdResp | None = None
    ) -> None:
        if self._closed.is_set():
            return  # the SMSC re-sends an unanswered deliver_sm on the next bind
        with contextlib.suppress(SessionClosed):
            await self._write(Pdu(command_id, request.sequence_number, status, body))

    def abort(self, reason: str) -> None:
        """Drop the connection now: pending requests fail, the provider re-binds."""
        if self._closed.is_set():
            return
        self.close_reason = reason
        self._closed.set()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(SessionClosed(reason))
        self._pending.clear()
        if self._keepalive_task is not None and self._keepalive_task is not asyncio.current_task():
            self._keepalive_task.cancel()
        self._writer.close()

    async def close(self, *, unbind: bool = True) -> None:
        if unbind and self.is_open:
            with contextlib.suppress(ResponseTimeout, SessionClosed, PduError, TimeoutError):
                async with asyncio.timeout(UNBIND_TIMEOUT_SECONDS):
                    await self.request(CommandId.UNBIND)
        self.abort("closed by us")
        tasks = [t for t in (self._reader_task, self._keepalive_task) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()

    def _allocate_sequence_number(self) -> int:
        while True:
            number = self._next_sequence
            self._next_sequence = 1 if number >= MAX_SEQUENCE_NUMBER else number + 1
            if number not in self._pending:
                return number

    async def _write(self, pdu: Pdu) -> None:
        if self._closed.is_set():
            raise SessionClosed(self.close_reason)
        try:
            self._writer.write(encode_pdu(pdu))
            await self._writer.drain()
        except (ConnectionError, RuntimeError) as exc:
            self.abort(f"write failed: {exc}")
            raise SessionClosed(self.close_reason) from exc

    async def _read(self) -> None:
        reason = "connection closed by the SMSC"
        try:
            while True:
                try:
                    pdu = decode_pdu(await read_frame(self._reader))
                except PduError as exc:
                    if exc.sequence_number is None:
                        reason = f"unreadable PDU stream: {exc}"
                        break
                    self._refuse(exc)
                    continue
                await self._dispatch(pdu)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            reason = f"connection lost: {exc or type(exc).__name__}"
        except SessionClosed:
            pass
        finally:
            self.abort(reason)

    def _refuse(self, error: PduError) -> None:
        assert error.sequence_number is not None
        pending = self._pending.get(error.sequence_number)
        if error.is_about_a_response:
            if pending is not None and not pending.done():
                pending.set_exception(error)
            return
        log.warning("smpp_pdu_refused", error=str(error))
        self._writer.write(
            encode_pdu(Pdu(CommandId.GENERIC_NACK, error.sequence_number, error.status))
        )

    async def _dispatch(self, pdu: Pdu) -> None:
        if pdu.is_response:
            pending = self._pending.get(pdu.sequence_number)
            if pending is not None and not pending.done():
                pending.set_result(pdu)
            else:
                log.info("smpp_late_response", command=pdu.command_id.name, seq=pdu.sequence_number)
        elif pdu.command_id == CommandId.ENQUIRE_LINK:
            await self._write(Pdu(CommandId.ENQUIRE_LINK_RESP, pdu.sequence_number))
        elif pdu.command_id == CommandId.DELIVER_SM:
            self._on_deliver_sm(self, pdu)
        elif pdu.command_id == CommandId.UNBIND:
            await self._write(Pdu(CommandId.UNBIND_RESP, pdu.sequence_number))
            self.abort("unbound by the SMSC")
        else:
            await self._write(
                Pdu(CommandId.GENERIC_NACK, pdu.sequence_number, CommandStatus.ESME_RINVCMDID)
            )

    async def _keep_alive(self) -> None:
        while True:
            await asyncio.sleep(self._config.enquire_link_interval)
            try:
                await self.request(CommandId.ENQUIRE_LINK)
            except ResponseTimeout:
                self.abort("no enquire_link_resp")
                return
            except SessionClosed:
                return
