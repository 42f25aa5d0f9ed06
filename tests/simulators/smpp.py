"""An SMSC stand-in on 127.0.0.1 that speaks SMPP 3.4 over TCP.

It checks bind credentials (0x0F invalid system_id, 0x0E invalid password, 0x0D when
told to refuse binds, 0x05 when already bound), answers enquire_link and sends its own
on demand, validates each submit_sm as an SMSC does (bound state, addresses with their
TON/NPI, esm_class, registered_delivery, validity_period, data_coding, short_message vs
message_payload, the UDH of a part with esm_class UDHI, the three SAR TLVs together, and
that a part fits the air interface: 160 septets or 140 octets with its UDH, the one the
SMSC adds for SAR counted), keeps each submit's raw PDU for independent decoders, can
play an SMSC without TLV support (`supports_tlvs=False`: 0xC1 for any TLV), answers
cancel_sm (0x11 once the message has its receipt or is unknown, or when the source
address differs), returns hex or decimal message ids, and sends delivery receipts as
`deliver_sm` (esm_class 0x04) with the Appendix B text and the `receipted_message_id`,
`message_state` and `network_error_code` TLVs. A receipt for a session that is gone
waits, as on a real SMSC, until an ESME binds as receiver or transceiver again.
`send_mo` sends a mobile-originated message (deliver_sm, esm_class 0) on a bound session.

What happens depends on how the destination number ends (see `SimulatedNumber`):

    ...0058  submit_sm_resp 0x58 ESME_RTHROTTLED
    ...0014  submit_sm_resp 0x14 ESME_RMSGQFUL
    ...0008  submit_sm_resp 0x08 ESME_RSYSERR
    ...0011  submit_sm_resp 0x0B ESME_RINVDSTADR
    ...0045  submit_sm_resp 0x45 ESME_RSUBMITFAIL
    ...0408  no submit_sm_resp at all (response timeouts)
    ...0003  accepted, never a receipt
    ...0099  accepted, receipt stat:UNDELIV err:001 (network_error_code GSM 0x0001)
    ...0098  accepted, receipt stat:EXPIRED
    ...0097  accepted, receipt stat:REJECTD err:002
    ...0077  accepted, the DELIVRD receipt is sent *before* the submit_sm_resp
    ...0096  accepted; part 1 of a concatenated message (or a single SMS) stat:UNDELIV,
             the other parts stat:DELIVRD
    ...0059  part 2 of a concatenated message 0x58 ESME_RTHROTTLED, the others accepted
             without a receipt
    other    accepted, receipt stat:DELIVRD

    async with SmscSimulator(system_id="cascade", password="secret") as smsc:
        ...SmppConfig(host=smsc.host, port=smsc.port, ...)...
        await smsc.wait_until(lambda: len(smsc.receipts) == 1)
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from types import TracebackType
from typing import Literal, Self

from providers.smpp_pdu import (
    BIND_COMMANDS,
    Bind,
    BindResp,
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
    decode_gsm7,
    decode_pdu,
    encode_pdu,
    encode_text,
    read_frame,
)

SMSC_SYSTEM_ID = "SIMSMSC"
WAIT_TIMEOUT_SECONDS = 5.0
FIRST_MESSAGE_ID = 3_000_000_000
RELATIVE_TIME = re.compile(r"^\d{12}000R$")
ABSOLUTE_TIME = re.compile(r"^\d{12}[0-9]\d{2}[+-]$")
ALPHANUMERIC_SENDER = re.compile(r"^[ -~]{1,11}$")


class SimulatedNumber(StrEnum):
    """Destination numbers that select a simulator behaviour."""

    DELIVERED = "+15550100001"
    THROTTLED = "+15550100058"
    QUEUE_FULL = "+15550100014"
    SYSTEM_ERROR = "+15550100008"
    INVALID_DESTINATION = "+15550100011"
    SUBMIT_FAILED = "+15550100045"
    NO_RESPONSE = "+15550100408"
    NO_RECEIPT = "+15550100003"
    UNDELIVERED = "+15550100099"
    EXPIRED = "+15550100098"
    REJECTED = "+15550100097"
    RECEIPT_BEFORE_RESPONSE = "+15550100077"
    FIRST_PART_UNDELIVERED = "+15550100096"
    SECOND_PART_THROTTLED = "+15550100059"


SUBMIT_REFUSALS: Mapping[str, CommandStatus] = {
    "0058": CommandStatus.ESME_RTHROTTLED,
    "0014": CommandStatus.ESME_RMSGQFUL,
    "0008": CommandStatus.ESME_RSYSERR,
    "0011": CommandStatus.ESME_RINVDSTADR,
    "0045": CommandStatus.ESME_RSUBMITFAIL,
}
# Ending -> (stat, err, message_state).
RECEIPT_OUTCOMES: Mapping[str, tuple[str, str, MessageState]] = {
    "0099": ("UNDELIV", "001", MessageState.UNDELIVERABLE),
    "0098": ("EXPIRED", "000", MessageState.EXPIRED),
    "0097": ("REJECTD", "002", MessageState.REJECTED),
}
DELIVERED = ("DELIVRD", "000", MessageState.DELIVERED)
STAT_STATES: Mapping[str, MessageState] = {
    "DELIVRD": MessageState.DELIVERED,
    "EXPIRED": MessageState.EXPIRED,
    "DELETED": MessageState.DELETED,
    "UNDELIV": MessageState.UNDELIVERABLE,
    "ACCEPTD": MessageState.ACCEPTED,
    "UNKNOWN": MessageState.UNKNOWN,
    "REJECTD": MessageState.REJECTED,
}
NETWORK_TYPE_GSM = 0x03
SAR_TAGS = frozenset({Tag.SAR_MSG_REF_NUM, Tag.SAR_TOTAL_SEGMENTS, Tag.SAR_SEGMENT_SEQNUM})
IEI_CONCATENATED_8BIT, IEI_CONCATENATED_16BIT = 0x00, 0x08


@dataclass(frozen=True, slots=True)
class RecordedBind:
    session: int
    command_id: CommandId
    system_id: str
    password: str
    system_type: str
    interface_version: int
    status: int


@dataclass(slots=True)
class RecordedSubmit:
    session: int
    sequence_number: int
    pdu: ShortMessage
    text: str | None
    status: int
    frame: bytes = b""  # the PDU as it came off the wire
    message_id: str | None = None
    cancelled: bool = False


@dataclass(frozen=True, slots=True)
class RecordedCancel:
    session: int
    pdu: CancelSm
    frame: bytes
    status: int


@dataclass(slots=True)
class SentReceipt:
    """One deliver_sm receipt, and the deliver_sm_resp status once the ESME answered."""

    message_id: str
    stat: str
    text: str
    tlvs: Mapping[int, bytes]
    handset: str
    sender: str
    session: int | None = None
    sequence_number: int | None = None
    response_status: int | None = None


@dataclass(eq=False)
class SmscSession:
    id: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    bound_as: CommandId | None = None
    sequence: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    pending: dict[int, asyncio.Future[Pdu]] = field(default_factory=dict)

    @property
    def can_transmit(self) -> bool:
        return self.bound_as in (CommandId.BIND_TRANSMITTER, CommandId.BIND_TRANSCEIVER)

    @property
    def can_receive(self) -> bool:
        return self.bound_as in (CommandId.BIND_RECEIVER, CommandId.BIND_TRANSCEIVER)


class SmscSimulator:
    def __init__(
        self,
        *,
        system_id: str = "cascade",
        password: str = "secret",
        message_ids: Literal["hex", "decimal"] = "hex",
        receipt_ids: Literal["same", "hex", "decimal"] = "same",
        receipt_tlvs: bool = True,
        response_delay_seconds: float = 0.0,
        receipt_delay_seconds: float = 0.0,
        supports_tlvs: bool = True,
    ) -> None:
        self.system_id = system_id
        self.password = password
        self._defaults = (message_ids, receipt_ids, receipt_tlvs, response_delay_seconds)
        self.supports_tlvs = supports_tlvs
        self._supports_tlvs = supports_tlvs
        self.message_ids = message_ids
        self.receipt_ids = receipt_ids
        self.receipt_tlvs = receipt_tlvs
        self.response_delay_seconds = response_delay_seconds
        self.receipt_delay_seconds = receipt_delay_seconds
        self.refuse_binds = False
        self.binds: list[RecordedBind] = []
        self.submits: list[RecordedSubmit] = []
        self.cancels: list[RecordedCancel] = []
        self.receipts: list[SentReceipt] = []
        self.enquire_links_received = 0
        self.unbinds_received = 0
        # "submit_sm_resp <id>", "deliver_sm <id>", "deliver_sm_resp <id>" in wire order.
        self.events: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._message_numbers = itertools.count(FIRST_MESSAGE_ID)
        self._session_ids = itertools.count(1)
        self._sessions: dict[int, SmscSession] = {}
        self._undelivered_receipts: list[SentReceipt] = []
        # Accepted, no receipt yet: what cancel_sm can still withdraw.
        self._cancellable: dict[str, RecordedSubmit] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Condition()
        self._server: asyncio.Server | None = None
        self.host = "127.0.0.1"
        self.port = 0

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        await self.drop_connections()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def reset(self) -> None:
        """Forget what was recorded and restore the default behaviour (sessions stay)."""
        message_ids, receipt_ids, receipt_tlvs, response_delay = self._defaults
        self.message_ids = message_ids
        self.receipt_ids = receipt_ids
        self.receipt_tlvs = receipt_tlvs
        self.response_delay_seconds = response_delay
        self.supports_tlvs = self._supports_tlvs
        self.refuse_binds = False
        self.binds.clear()
        self.submits.clear()
        self.cancels.clear()
        self._cancellable.clear()
        self.receipts.clear()
        self.events.clear()
        self._undelivered_receipts.clear()
        self.enquire_links_received = 0
        self.unbinds_received = 0
        self.max_in_flight = 0

    @property
    def bound_sessions(self) -> list[int]:
        return [s.id for s in self._sessions.values() if s.bound_as is not None]

    def submits_to(self, number: str) -> list[RecordedSubmit]:
        return [s for s in self.submits if s.pdu.destination_addr == number.removeprefix("+")]

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        async with self._changed, asyncio.timeout(WAIT_TIMEOUT_SECONDS):
            await self._changed.wait_for(predicate)

    async def drop_connections(self) -> None:
        """Cut every TCP connection without an unbind, as a network failure would."""
        for session in list(self._sessions.values()):
            session.writer.transport.abort()
        await self.wait_until(lambda: not self._sessions)

    async def enquire_link(self) -> Pdu:
        """Send enquire_link on the latest bound session and return the ESME's answer."""
        session = self._sessions[max(self.bound_sessions)]
        return await self._request(session, CommandId.ENQUIRE_LINK)

    async def send_receipt(
        self, message_id: str, stat: str, err: str = "000", *, to: str = "15550100001"
    ) -> SentReceipt:
        """A receipt for `message_id` as given, e.g. one submitted by another process."""
        receipt = self._receipt(message_id, stat, err, STAT_STATES[stat], to, "", "Hello")
        await self._deliver(receipt)
        return receipt

    async def send_mo(
        self,
        handset: str,
        text: str,
        *,
        to: str = "Cascade",
        in_payload: bool = False,
        data_coding: int = DataCoding.SMSC_DEFAULT,
    ) -> int:
        """A mobile-originated message from `handset` (E.164, sent as TON 1 digits) to our
        `to`, as deliver_sm with esm_class 0: the text in the default alphabet when it fits
        (`data_coding`), else UCS-2, in short_message or (`in_payload`) the
        message_payload TLV. Returns the ESME's deliver_sm_resp command_status."""
        coding, encoded = encode_text(text, data_coding)
        deliver_sm = ShortMessage(
            source_addr_ton=1,
            source_addr_npi=1,
            source_addr=handset.removeprefix("+"),
            dest_addr_ton=5 if not to.isdigit() else 1,
            dest_addr_npi=0 if not to.isdigit() else 1,
            destination_addr=to,
            esm_class=EsmClass.DEFAULT,
            data_coding=coding,
            short_message=b"" if in_payload else encoded,
            tlvs={Tag.MESSAGE_PAYLOAD: encoded} if in_payload else {},
        )
        [session] = [s for s in self._sessions.values() if s.can_receive][:1]
        response = await self._request(session, CommandId.DELIVER_SM, deliver_sm)
        self.events.append(f"deliver_sm_resp mo {response.command_status}")
        return response.command_status

    # -- connection ------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = SmscSession(next(self._session_ids), reader, writer)
        self._sessions[session.id] = session
        try:
            while True:
                try:
                    frame = await read_frame(reader)
                    pdu = decode_pdu(frame)
                except PduError as exc:
                    if exc.sequence_number is None:
                        break
                    if not exc.is_about_a_response:
                        await self._write(
                            session, Pdu(CommandId.GENERIC_NACK, exc.sequence_number, exc.status)
                        )
                    continue
                await self._handle(session, pdu, frame)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            del self._sessions[session.id]
            for future in session.pending.values():
                if not future.done():
                    future.set_exception(ConnectionResetError("session closed"))
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            await self._notify()

    async def _handle(self, session: SmscSession, pdu: Pdu, frame: bytes) -> None:
        command = pdu.command_id
        if pdu.is_response:
            future = session.pending.pop(pdu.sequence_number, None)
            if future is not None and not future.done():
                future.set_result(pdu)
        elif command in BIND_COMMANDS:
            assert isinstance(pdu.body, Bind)
            await self._bind(session, pdu, pdu.body)
        elif command == CommandId.ENQUIRE_LINK:
            self.enquire_links_received += 1
            await self._write(session, Pdu(CommandId.ENQUIRE_LINK_RESP, pdu.sequence_number))
            await self._notify()
        elif command == CommandId.UNBIND:
            self.unbinds_received += 1
            await self._write(session, Pdu(CommandId.UNBIND_RESP, pdu.sequence_number))
            session.bound_as = None
            session.writer.close()
        elif command == CommandId.SUBMIT_SM:
            assert isinstance(pdu.body, ShortMessage)
            self._spawn(self._submit(session, pdu.sequence_number, pdu.body, frame))
        elif command == CommandId.CANCEL_SM:
            assert isinstance(pdu.body, CancelSm)
            status = self._cancel(session, pdu.body, frame)
            await self._write(session, Pdu(CommandId.CANCEL_SM_RESP, pdu.sequence_number, status))
            await self._notify()
        else:
            await self._write(
                session,
                Pdu(CommandId.GENERIC_NACK, pdu.sequence_number, CommandStatus.ESME_RINVCMDID),
            )

    async def _bind(self, session: SmscSession, pdu: Pdu, bind: Bind) -> None:
        if session.bound_as is not None:
            status = CommandStatus.ESME_RALYBND
        elif bind.system_id != self.system_id:
            status = CommandStatus.ESME_RINVSYSID
        elif bind.password != self.password:
            status = CommandStatus.ESME_RINVPASWD
        elif self.refuse_binds or bind.interface_version < 0x33:
            status = CommandStatus.ESME_RBINDFAIL
        else:
            status = CommandStatus.ESME_ROK
        self.binds.append(
            RecordedBind(
                session.id,
                pdu.command_id,
                bind.system_id,
                bind.password,
                bind.system_type,
                bind.interface_version,
                status,
            )
        )
        response_id = CommandId(pdu.command_id | 0x80000000)
        # SMPP 3.4 §4.1.2: no body when the bind is refused.
        body = (
            BindResp(SMSC_SYSTEM_ID, {Tag.SC_INTERFACE_VERSION: b"\x34"})
            if status == CommandStatus.ESME_ROK
            else None
        )
        await self._write(session, Pdu(response_id, pdu.sequence_number, status, body))
        if status == CommandStatus.ESME_ROK:
            session.bound_as = pdu.command_id
            if session.can_receive:
                waiting, self._undelivered_receipts = self._undelivered_receipts, []
                for receipt in waiting:
                    self._spawn(self._deliver(receipt))
        await self._notify()

    # -- submit_sm -------------------------------------------------------------------

    async def _submit(
        self, session: SmscSession, sequence_number: int, sm: ShortMessage, frame: bytes
    ) -> None:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            status = self._validate(session, sm)
            ending = sm.destination_addr[-4:]
            part = part_number(sm)
            if status == CommandStatus.ESME_ROK:
                status = SUBMIT_REFUSALS.get(ending, status)
            if ending == SimulatedNumber.SECOND_PART_THROTTLED[-4:] and part == 2:
                status = CommandStatus.ESME_RTHROTTLED
            submit = RecordedSubmit(
                session.id, sequence_number, sm, submitted_text(sm), status, frame
            )
            self.submits.append(submit)
            await self._notify()
            if ending == SimulatedNumber.NO_RESPONSE[-4:]:
                return
            if self.response_delay_seconds:
                await asyncio.sleep(self.response_delay_seconds)

            receipt = None
            if status == CommandStatus.ESME_ROK:
                submit.message_id = self._next_message_id()
                self._cancellable[submit.message_id] = submit
                silent = (
                    SimulatedNumber.NO_RECEIPT[-4:],
                    SimulatedNumber.SECOND_PART_THROTTLED[-4:],
                )
                if sm.registered_delivery & 0x03 and ending not in silent:
                    del self._cancellable[submit.message_id]
                    stat, err, state = RECEIPT_OUTCOMES.get(ending, DELIVERED)
                    if ending == SimulatedNumber.FIRST_PART_UNDELIVERED[-4:]:
                        stat, err, state = (
                            RECEIPT_OUTCOMES["0099"] if part in (None, 1) else DELIVERED
                        )
                    receipt = self._receipt(
                        submit.message_id,
                        stat,
                        err,
                        state,
                        sm.destination_addr,
                        sm.source_addr,
                        submit.text or "",
                    )
            if receipt is not None and ending == SimulatedNumber.RECEIPT_BEFORE_RESPONSE[-4:]:
                await self._send_deliver_sm(session, receipt)
                receipt = None
            response = MessageIdResp(submit.message_id) if submit.message_id else None
            self.events.append(f"submit_sm_resp {submit.message_id or status}")
            await self._write(
                session, Pdu(CommandId.SUBMIT_SM_RESP, sequence_number, status, response)
            )
            if receipt is not None:
                if self.receipt_delay_seconds:
                    await asyncio.sleep(self.receipt_delay_seconds)
                await self._deliver(receipt, prefer=session)
        finally:
            self.in_flight -= 1
            await self._notify()

    def _validate(self, session: SmscSession, sm: ShortMessage) -> CommandStatus:
        if not session.can_transmit:
            return CommandStatus.ESME_RINVBNDSTS
        if sm.source_addr_ton == 5:
            if not ALPHANUMERIC_SENDER.match(sm.source_addr):
                return CommandStatus.ESME_RINVSRCADR
        elif not sm.source_addr.isdigit():
            return CommandStatus.ESME_RINVSRCADR
        if sm.dest_addr_ton != 1:
            return CommandStatus.ESME_RINVDSTTON
        if sm.dest_addr_npi != 1:
            return CommandStatus.ESME_RINVDSTNPI
        if not (sm.destination_addr.isdigit() and 2 <= len(sm.destination_addr) <= 15):
            return CommandStatus.ESME_RINVDSTADR
        if sm.esm_class & ~(EsmClass.UDH_INDICATOR | 0x03):
            return CommandStatus.ESME_RINVESMCLASS
        if sm.tlvs and not self.supports_tlvs:
            return CommandStatus.ESME_ROPTPARNOTALLWD
        if sm.registered_delivery & ~0x1F:
            return CommandStatus.ESME_RINVREGDLVFLG
        if sm.schedule_delivery_time and not valid_smpp_time(sm.schedule_delivery_time):
            return CommandStatus.ESME_RINVSCHED
        if sm.validity_period and not valid_smpp_time(sm.validity_period):
            return CommandStatus.ESME_RINVEXPIRY
        if sm.data_coding not in (
            DataCoding.SMSC_DEFAULT,
            DataCoding.IA5,
            DataCoding.LATIN1,
            DataCoding.UCS2,
        ):
            return CommandStatus.ESME_RSUBMITFAIL
        payload = sm.tlvs.get(Tag.MESSAGE_PAYLOAD)
        # §5.3.2.32: with message_payload, sm_length is 0; a message needs one of the two.
        if bool(payload) == bool(sm.short_message):
            return CommandStatus.ESME_RINVMSGLEN
        udh = user_data_header(sm)
        if sm.esm_class & EsmClass.UDH_INDICATOR and udh is None:
            return CommandStatus.ESME_RINVMSGLEN
        sar = SAR_TAGS & sm.tlvs.keys()
        if sar and sar != SAR_TAGS:
            return CommandStatus.ESME_RMISSINGOPTPARAM
        if (
            sar
            and not 1 <= sm.tlvs[Tag.SAR_SEGMENT_SEQNUM][0] <= sm.tlvs[Tag.SAR_TOTAL_SEGMENTS][0]
        ):
            return CommandStatus.ESME_RINVOPTPARAMVAL
        text = sm.short_message[len(udh or b"") :]
        if sm.data_coding == DataCoding.UCS2 and len(text or payload or b"") % 2:
            return CommandStatus.ESME_RINVMSGLEN
        if sm.data_coding == DataCoding.IA5 and not (text or payload or b"").isascii():
            return CommandStatus.ESME_RSUBMITFAIL
        # The SMSC puts a 6-octet concatenation UDH in front of each SAR part itself.
        header_octets = len(udh) if udh is not None else 6 if sar else 0
        if not payload and not fits_one_sms(sm.data_coding, header_octets, len(text)):
            return CommandStatus.ESME_RINVMSGLEN
        return CommandStatus.ESME_ROK

    def _cancel(self, session: SmscSession, cancel: CancelSm, frame: bytes) -> CommandStatus:
        submit = self._cancellable.get(cancel.message_id)
        if not session.can_transmit:
            status = CommandStatus.ESME_RINVBNDSTS
        elif submit is not None and submits_match(submit.pdu, cancel):
            status = CommandStatus.ESME_ROK
            submit.cancelled = True
            del self._cancellable[cancel.message_id]
        else:  # unknown, already final, or not this sender's
            status = CommandStatus.ESME_RCANCELFAIL
        self.cancels.append(RecordedCancel(session.id, cancel, frame, status))
        return status

    def _next_message_id(self) -> str:
        number = next(self._message_numbers)
        return f"{number:08X}" if self.message_ids == "hex" else str(number)

    # -- deliver_sm receipts ---------------------------------------------------------

    def _receipt(
        self,
        message_id: str,
        stat: str,
        err: str,
        state: MessageState,
        handset: str,
        sender: str,
        text: str,
    ) -> SentReceipt:
        receipt_id = self._receipt_id(message_id)
        now = datetime.now(UTC).strftime("%y%m%d%H%M")
        delivered = "001" if stat == "DELIVRD" else "000"
        body = (
            f"id:{receipt_id} sub:001 dlvrd:{delivered} submit date:{now} done date:{now}"
            f" stat:{stat} err:{err} text:{text[:20]}"
        )
        tlvs: dict[int, bytes] = {}
        if self.receipt_tlvs:
            tlvs[Tag.RECEIPTED_MESSAGE_ID] = receipt_id.encode() + b"\x00"
            tlvs[Tag.MESSAGE_STATE] = bytes((state,))
            if err.strip("0"):
                tlvs[Tag.NETWORK_ERROR_CODE] = bytes((NETWORK_TYPE_GSM,)) + int(err).to_bytes(2)
        return SentReceipt(receipt_id, stat, body, tlvs, handset=handset, sender=sender)

    def _receipt_id(self, message_id: str) -> str:
        if self.receipt_ids == "same":
            return message_id
        number = int(message_id, 16) if self.message_ids == "hex" else int(message_id)
        return f"{number:08X}" if self.receipt_ids == "hex" else str(number)

    async def _deliver(self, receipt: SentReceipt, prefer: SmscSession | None = None) -> None:
        receivers = [s for s in self._sessions.values() if s.can_receive]
        if prefer is not None and prefer.can_receive:
            receivers.insert(0, prefer)
        if not receivers:
            self._undelivered_receipts.append(receipt)
            return
        await self._send_deliver_sm(receivers[0], receipt)

    async def _send_deliver_sm(self, session: SmscSession, receipt: SentReceipt) -> None:
        # The handset is the receipt's source; the ESME's sender address is its destination.
        sender = receipt.sender
        deliver_sm = ShortMessage(
            source_addr_ton=1,
            source_addr_npi=1,
            source_addr=receipt.handset,
            dest_addr_ton=5 if sender and not sender.isdigit() else 1,
            dest_addr_npi=0 if sender and not sender.isdigit() else 1,
            destination_addr=sender,
            esm_class=0x04,
            data_coding=DataCoding.SMSC_DEFAULT,
            short_message=receipt.text.encode("ascii", errors="replace"),
            tlvs=receipt.tlvs,
        )
        receipt.session = session.id
        self.receipts.append(receipt)
        self.events.append(f"deliver_sm {receipt.message_id}")
        self._spawn(self._await_deliver_sm_resp(session, receipt, deliver_sm))

    async def _await_deliver_sm_resp(
        self, session: SmscSession, receipt: SentReceipt, deliver_sm: ShortMessage
    ) -> None:
        with contextlib.suppress(ConnectionError):
            response = await self._request(session, CommandId.DELIVER_SM, deliver_sm, receipt)
            receipt.response_status = response.command_status
            self.events.append(f"deliver_sm_resp {receipt.message_id}")
            await self._notify()

    async def _request(
        self,
        session: SmscSession,
        command_id: CommandId,
        body: ShortMessage | None = None,
        receipt: SentReceipt | None = None,
    ) -> Pdu:
        sequence_number = next(session.sequence)
        if receipt is not None:
            receipt.sequence_number = sequence_number
        future: asyncio.Future[Pdu] = asyncio.get_running_loop().create_future()
        session.pending[sequence_number] = future
        await self._write(session, Pdu(command_id, sequence_number, 0, body))
        async with asyncio.timeout(WAIT_TIMEOUT_SECONDS):
            return await future

    # -- plumbing --------------------------------------------------------------------

    async def _write(self, session: SmscSession, pdu: Pdu) -> None:
        session.writer.write(encode_pdu(pdu))
        with contextlib.suppress(ConnectionError):
            await session.writer.drain()

    def _spawn(self, coroutine: Coroutine[object, object, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()


def submits_match(sm: ShortMessage, cancel: CancelSm) -> bool:
    """§4.9.1: the source must be the submit's; the destination may be left NULL."""
    return (cancel.service_type, cancel.source_addr) == (
        sm.service_type,
        sm.source_addr,
    ) and cancel.destination_addr in ("", sm.destination_addr)


def user_data_header(sm: ShortMessage) -> bytes | None:
    """The UDH (its length octet included) of a submit with UDHI whose elements are well
    formed; None without UDHI or when it is broken."""
    if not sm.esm_class & EsmClass.UDH_INDICATOR or not sm.short_message:
        return None
    end = sm.short_message[0] + 1
    if end > len(sm.short_message):
        return None
    at = 1
    while at < end:
        if at + 2 > end or at + 2 + sm.short_message[at + 1] > end:
            return None
        at += 2 + sm.short_message[at + 1]
    return sm.short_message[:end]


def part_number(sm: ShortMessage) -> int | None:
    """Which part of a concatenated message this is (UDH IEI 0x00/0x08 or SAR), if any."""
    if Tag.SAR_SEGMENT_SEQNUM in sm.tlvs:
        return sm.tlvs[Tag.SAR_SEGMENT_SEQNUM][0]
    udh = user_data_header(sm)
    at = 1
    while udh is not None and at < len(udh):
        iei, length = udh[at], udh[at + 1]
        if iei in (IEI_CONCATENATED_8BIT, IEI_CONCATENATED_16BIT):
            return udh[at + 1 + length]  # the last octet of the element
        at += 2 + length
    return None


def fits_one_sms(data_coding: int, header_octets: int, text_octets: int) -> bool:
    """140 octets of user data: septets (one per octet here) for 7-bit alphabets, after a
    header padded to a septet boundary."""
    if data_coding in (DataCoding.SMSC_DEFAULT, DataCoding.IA5):
        return text_octets + -(-header_octets * 8 // 7) <= 160
    return header_octets + text_octets <= 140


def submitted_text(sm: ShortMessage) -> str | None:
    """The text of a submit (of this part, without its UDH), decoded as an SMSC would."""
    udh = user_data_header(sm) or b""
    raw = sm.short_message[len(udh) :] or sm.tlvs.get(Tag.MESSAGE_PAYLOAD, b"")
    if sm.data_coding == DataCoding.UCS2:
        return raw.decode("utf-16-be", errors="strict") if len(raw) % 2 == 0 else None
    if sm.data_coding == DataCoding.SMSC_DEFAULT:
        return decode_gsm7(raw)
    return raw.decode("latin-1")


def valid_smpp_time(value: str) -> bool:
    """SMPP 3.4 §7.1.1: `YYMMDDhhmmsstnnp`, relative (`…R`) or absolute (`…+`/`…-`)."""
    return bool(RELATIVE_TIME.match(value) or ABSOLUTE_TIME.match(value))
