"""SMPP 3.4 PDUs on the wire: header, C-octet strings, TLVs, and the SMS alphabets.

Only the operations an ESME transceiver needs are decoded into typed bodies: the three
binds, submit_sm / deliver_sm (one layout, SMPP 3.4 §4.4.1 and §4.6.1), their
`message_id` responses, cancel_sm (§4.9.1), and the header-only cancel_sm_resp,
enquire_link, unbind and generic_nack.
Any other command id is refused with `ESME_RINVCMDID`, which the receiver answers with
a generic_nack. Every PDU is `command_length, command_id, command_status,
sequence_number` (four big-endian unsigned 32-bit integers) followed by its body.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum

HEADER = struct.Struct(">IIII")
TLV_HEADER = struct.Struct(">HH")
HEADER_LENGTH = HEADER.size
INTERFACE_VERSION = 0x34
MAX_SEQUENCE_NUMBER = 0x7FFFFFFF
MAX_SHORT_MESSAGE_LENGTH = 254
# A message_payload TLV holds at most 64 KiB; nothing legitimate is longer than that plus fields.
MAX_PDU_LENGTH = HEADER_LENGTH + 0x10000 + 1024


class CommandId(IntEnum):
    GENERIC_NACK = 0x80000000
    BIND_RECEIVER = 0x00000001
    BIND_RECEIVER_RESP = 0x80000001
    BIND_TRANSMITTER = 0x00000002
    BIND_TRANSMITTER_RESP = 0x80000002
    SUBMIT_SM = 0x00000004
    SUBMIT_SM_RESP = 0x80000004
    DELIVER_SM = 0x00000005
    DELIVER_SM_RESP = 0x80000005
    UNBIND = 0x00000006
    UNBIND_RESP = 0x80000006
    CANCEL_SM = 0x00000008
    CANCEL_SM_RESP = 0x80000008
    BIND_TRANSCEIVER = 0x00000009
    BIND_TRANSCEIVER_RESP = 0x80000009
    ENQUIRE_LINK = 0x00000015
    ENQUIRE_LINK_RESP = 0x80000015


RESPONSE_BIT = 0x80000000
BIND_COMMANDS = frozenset(
    {CommandId.BIND_RECEIVER, CommandId.BIND_TRANSMITTER, CommandId.BIND_TRANSCEIVER}
)
BIND_RESPONSES = frozenset(CommandId(c | RESPONSE_BIT) for c in BIND_COMMANDS)
SHORT_MESSAGE_COMMANDS = frozenset({CommandId.SUBMIT_SM, CommandId.DELIVER_SM})
MESSAGE_ID_RESPONSES = frozenset({CommandId.SUBMIT_SM_RESP, CommandId.DELIVER_SM_RESP})
HEADER_ONLY_COMMANDS = frozenset(
    {
        CommandId.GENERIC_NACK,
        CommandId.UNBIND,
        CommandId.UNBIND_RESP,
        CommandId.ENQUIRE_LINK,
        CommandId.ENQUIRE_LINK_RESP,
        CommandId.CANCEL_SM_RESP,
    }
)


class CommandStatus(IntEnum):
    """The SMPP 3.4 error codes (§5.1.3) this codebase names."""

    ESME_ROK = 0x00
    ESME_RINVMSGLEN = 0x01
    ESME_RINVCMDLEN = 0x02
    ESME_RINVCMDID = 0x03
    ESME_RINVBNDSTS = 0x04
    ESME_RALYBND = 0x05
    ESME_RINVPRTFLG = 0x06
    ESME_RINVREGDLVFLG = 0x07
    ESME_RSYSERR = 0x08
    ESME_RINVSRCADR = 0x0A
    ESME_RINVDSTADR = 0x0B
    ESME_RINVMSGID = 0x0C
    ESME_RBINDFAIL = 0x0D
    ESME_RINVPASWD = 0x0E
    ESME_RINVSYSID = 0x0F
    ESME_RCANCELFAIL = 0x11
    ESME_RMSGQFUL = 0x14
    ESME_RINVSERTYP = 0x15
    ESME_RINVESMCLASS = 0x43
    ESME_RSUBMITFAIL = 0x45
    ESME_RINVSRCTON = 0x48
    ESME_RINVSRCNPI = 0x49
    ESME_RINVDSTTON = 0x50
    ESME_RINVDSTNPI = 0x51
    ESME_RINVSYSTYP = 0x53
    ESME_RTHROTTLED = 0x58
    ESME_RINVSCHED = 0x61
    ESME_RINVEXPIRY = 0x62
    ESME_RX_T_APPN = 0x64
    ESME_RX_P_APPN = 0x65
    ESME_RX_R_APPN = 0x66
    ESME_RINVOPTPARSTREAM = 0xC0
    ESME_ROPTPARNOTALLWD = 0xC1
    ESME_RINVPARLEN = 0xC2
    ESME_RMISSINGOPTPARAM = 0xC3
    ESME_RINVOPTPARAMVAL = 0xC4
    ESME_RDELIVERYFAILURE = 0xFE
    ESME_RUNKNOWNERR = 0xFF


def status_name(status: int) -> str:
    try:
        return CommandStatus(status).name
    except ValueError:
        return f"0x{status:08X}"


class Tag(IntEnum):
    """Optional parameter tags (§5.3.2) used here."""

    USER_MESSAGE_REFERENCE = 0x0204
    SAR_MSG_REF_NUM = 0x020C
    SAR_TOTAL_SEGMENTS = 0x020E
    SAR_SEGMENT_SEQNUM = 0x020F
    SC_INTERFACE_VERSION = 0x0210
    RECEIPTED_MESSAGE_ID = 0x001E
    NETWORK_ERROR_CODE = 0x0423
    MESSAGE_PAYLOAD = 0x0424
    MESSAGE_STATE = 0x0427


class MessageState(IntEnum):
    """`message_state` values (§5.2.28)."""

    ENROUTE = 1
    DELIVERED = 2
    EXPIRED = 3
    DELETED = 4
    UNDELIVERABLE = 5
    ACCEPTED = 6
    UNKNOWN = 7
    REJECTED = 8


class EsmClass(IntEnum):
    DEFAULT = 0x00
    DELIVERY_RECEIPT = 0x04
    UDH_INDICATOR = 0x40


class DataCoding(IntEnum):
    SMSC_DEFAULT = 0x00  # GSM 03.38 default alphabet here, one septet per octet
    IA5 = 0x01  # ASCII
    LATIN1 = 0x03
    UCS2 = 0x08


class PduError(ValueError):
    """A PDU that breaks the spec; `status` is the error code to answer it with."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        command_id: int | None = None,
        sequence_number: int | None = None,
    ) -> None:
        super().__init__(f"{status_name(status)}: {detail}")
        self.status = status
        self.detail = detail
        self.command_id = command_id
        self.sequence_number = sequence_number

    @property
    def is_about_a_response(self) -> bool:
        return self.command_id is not None and bool(self.command_id & RESPONSE_BIT)


# Longest value of each C-octet string field, terminating NUL included (§4).
SYSTEM_ID_MAX = 16
PASSWORD_MAX = 9
SYSTEM_TYPE_MAX = 13
ADDRESS_RANGE_MAX = 41
SERVICE_TYPE_MAX = 6
ADDRESS_MAX = 21
TIME_MAX = 17
MESSAGE_ID_MAX = 65


@dataclass(frozen=True, slots=True)
class Bind:
    """bind_transmitter, bind_receiver and bind_transceiver share this body."""

    system_id: str
    password: str
    system_type: str = ""
    interface_version: int = INTERFACE_VERSION
    addr_ton: int = 0
    addr_npi: int = 0
    address_range: str = ""


@dataclass(frozen=True, slots=True)
class BindResp:
    """Without a body when the bind is refused (§4.1.2)."""

    system_id: str = ""
    tlvs: Mapping[int, bytes] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ShortMessage:
    """submit_sm and deliver_sm: the same mandatory fields, then TLVs."""

    service_type: str = ""
    source_addr_ton: int = 0
    source_addr_npi: int = 0
    source_addr: str = ""
    dest_addr_ton: int = 0
    dest_addr_npi: int = 0
    destination_addr: str = ""
    esm_class: int = 0
    protocol_id: int = 0
    priority_flag: int = 0
    schedule_delivery_time: str = ""
    validity_period: str = ""
    registered_delivery: int = 0
    replace_if_present_flag: int = 0
    data_coding: int = 0
    sm_default_msg_id: int = 0
    short_message: bytes = b""
    tlvs: Mapping[int, bytes] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CancelSm:
    """cancel_sm: `message_id` and the addresses it was submitted with (§4.9.1)."""

    service_type: str = ""
    message_id: str = ""
    source_addr_ton: int = 0
    source_addr_npi: int = 0
    source_addr: str = ""
    dest_addr_ton: int = 0
    dest_addr_npi: int = 0
    destination_addr: str = ""


@dataclass(frozen=True, slots=True)
class MessageIdResp:
    """submit_sm_resp (the SMSC's message id) and deliver_sm_resp (message_id unused, NULL)."""

    message_id: str = ""


Body = Bind | BindResp | ShortMessage | CancelSm | MessageIdResp


@dataclass(frozen=True, slots=True)
class Pdu:
    command_id: CommandId
    sequence_number: int
    command_status: int = 0
    body: Body | None = None

    @property
    def is_response(self) -> bool:
        return bool(self.command_id & RESPONSE_BIT)


# -- encoding --------------------------------------------------------------------------


def encode_pdu(pdu: Pdu) -> bytes:
    body = encode_body(pdu.command_id, pdu.body)
    return (
        HEADER.pack(
            HEADER_LENGTH + len(body), pdu.command_id, pdu.command_status, pdu.sequence_number
        )
        + body
    )


def encode_body(command_id: CommandId, body: Body | None) -> bytes:
    match body:
        case None:
            return b""
        case Bind() if command_id in BIND_COMMANDS:
            return b"".join(
                (
                    c_octet_string(body.system_id, SYSTEM_ID_MAX),
                    c_octet_string(body.password, PASSWORD_MAX),
                    c_octet_string(body.system_type, SYSTEM_TYPE_MAX),
                    bytes((body.interface_version, body.addr_ton, body.addr_npi)),
                    c_octet_string(body.address_range, ADDRESS_RANGE_MAX),
                )
            )
        case BindResp() if command_id in BIND_RESPONSES:
            return c_octet_string(body.system_id, SYSTEM_ID_MAX) + encode_tlvs(body.tlvs)
        case ShortMessage() if command_id in SHORT_MESSAGE_COMMANDS:
            return encode_short_message(body)
        case CancelSm() if command_id == CommandId.CANCEL_SM:
            return b"".join(
                (
                    c_octet_string(body.service_type, SERVICE_TYPE_MAX),
                    c_octet_string(body.message_id, MESSAGE_ID_MAX),
                    bytes((body.source_addr_ton, body.source_addr_npi)),
                    c_octet_string(body.source_addr, ADDRESS_MAX),
                    bytes((body.dest_addr_ton, body.dest_addr_npi)),
                    c_octet_string(body.destination_addr, ADDRESS_MAX),
                )
            )
        case MessageIdResp() if command_id in MESSAGE_ID_RESPONSES:
            return c_octet_string(body.message_id, MESSAGE_ID_MAX)
    raise ValueError(f"{type(body).__name__} is not the body of {command_id.name}")


def encode_short_message(body: ShortMessage) -> bytes:
    if len(body.short_message) > MAX_SHORT_MESSAGE_LENGTH:
        raise ValueError(f"short_message is longer than {MAX_SHORT_MESSAGE_LENGTH} octets")
    return b"".join(
        (
            c_octet_string(body.service_type, SERVICE_TYPE_MAX),
            bytes((body.source_addr_ton, body.source_addr_npi)),
            c_octet_string(body.source_addr, ADDRESS_MAX),
            bytes((body.dest_addr_ton, body.dest_addr_npi)),
            c_octet_string(body.destination_addr, ADDRESS_MAX),
            bytes((body.esm_class, body.protocol_id, body.priority_flag)),
            c_octet_string(body.schedule_delivery_time, TIME_MAX),
            c_octet_string(body.validity_period, TIME_MAX),
            bytes(
                (
                    body.registered_delivery,
                    body.replace_if_present_flag,
                    body.data_coding,
                    body.sm_default_msg_id,
                    len(body.short_message),
                )
            ),
            body.short_message,
            encode_tlvs(body.tlvs),
        )
    )


def c_octet_string(value: str, max_length: int) -> bytes:
    """ASCII then NUL; `max_length` counts the NUL, as the spec's field sizes do."""
    encoded = value.encode("ascii")
    if b"\x00" in encoded or len(encoded) + 1 > max_length:
        raise ValueError(f"{value!r} does not fit a C-octet string of {max_length} octets")
    return encoded + b"\x00"


def encode_tlvs(tlvs: Mapping[int, bytes]) -> bytes:
    return b"".join(TLV_HEADER.pack(tag, len(value)) + value for tag, value in tlvs.items())


# -- decoding --------------------------------------------------------------------------


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    """One whole PDU from the stream. Raises `asyncio.IncompleteReadError` at EOF and
    `PduError` when the length is impossible, after which the stream is out of step."""
    prefix = await reader.readexactly(4)
    (length,) = struct.unpack(">I", prefix)
    if not HEADER_LENGTH <= length <= MAX_PDU_LENGTH:
        raise PduError(CommandStatus.ESME_RINVCMDLEN, f"command_length {length}")
    return prefix + await reader.readexactly(length - 4)


def decode_pdu(frame: bytes) -> Pdu:
    if len(frame) < HEADER_LENGTH:
        raise PduError(CommandStatus.ESME_RINVCMDLEN, f"{len(frame)} octets, shorter than a header")
    length, raw_command_id, status, sequence_number = HEADER.unpack_from(frame)
    if length != len(frame):
        raise PduError(
            CommandStatus.ESME_RINVCMDLEN,
            f"command_length {length} but {len(frame)} octets",
            command_id=raw_command_id,
            sequence_number=sequence_number,
        )
    try:
        command_id = CommandId(raw_command_id)
    except ValueError:
        raise PduError(
            CommandStatus.ESME_RINVCMDID,
            f"command_id 0x{raw_command_id:08X} is not supported",
            command_id=raw_command_id,
            sequence_number=sequence_number,
        ) from None
    try:
        body = decode_body(command_id, status, frame[HEADER_LENGTH:])
    except PduError as exc:
        raise PduError(
            exc.status, exc.detail, command_id=command_id, sequence_number=sequence_number
        ) from None
    return Pdu(command_id, sequence_number, status, body)


def decode_body(command_id: CommandId, status: int, data: bytes) -> Body | None:
    if command_id in HEADER_ONLY_COMMANDS:
        if data:
            raise PduError(CommandStatus.ESME_RINVCMDLEN, f"{command_id.name} has a body")
        return None
    # Error responses may leave the body out (§4.1.2, §4.4.2).
    if command_id & RESPONSE_BIT and status != CommandStatus.ESME_ROK and not data:
        return None
    cursor = Cursor(data)
    body: Body
    if command_id in BIND_COMMANDS:
        body = Bind(
            system_id=cursor.c_octet_string(SYSTEM_ID_MAX, "system_id"),
            password=cursor.c_octet_string(PASSWORD_MAX, "password"),
            system_type=cursor.c_octet_string(SYSTEM_TYPE_MAX, "system_type"),
            interface_version=cursor.octet("interface_version"),
            addr_ton=cursor.octet("addr_ton"),
            addr_npi=cursor.octet("addr_npi"),
            address_range=cursor.c_octet_string(ADDRESS_RANGE_MAX, "address_range"),
        )
    elif command_id in BIND_RESPONSES:
        body = BindResp(cursor.c_octet_string(SYSTEM_ID_MAX, "system_id"), cursor.tlvs())
    elif command_id in SHORT_MESSAGE_COMMANDS:
        body = decode_short_message(cursor)
    elif command_id == CommandId.CANCEL_SM:
        body = CancelSm(
            service_type=cursor.c_octet_string(SERVICE_TYPE_MAX, "service_type"),
            message_id=cursor.c_octet_string(MESSAGE_ID_MAX, "message_id"),
            source_addr_ton=cursor.octet("source_addr_ton"),
            source_addr_npi=cursor.octet("source_addr_npi"),
            source_addr=cursor.c_octet_string(ADDRESS_MAX, "source_addr"),
            dest_addr_ton=cursor.octet("dest_addr_ton"),
            dest_addr_npi=cursor.octet("dest_addr_npi"),
            destination_addr=cursor.c_octet_string(ADDRESS_MAX, "destination_addr"),
        )
    else:
        # deliver_sm_resp from some SMSCs and ESMEs omits even the NULL message_id.
        body = MessageIdResp(cursor.c_octet_string(MESSAGE_ID_MAX, "message_id") if data else "")
    cursor.expect_end()
    return body


def decode_short_message(cursor: Cursor) -> ShortMessage:
    service_type = cursor.c_octet_string(SERVICE_TYPE_MAX, "service_type")
    source_addr_ton = cursor.octet("source_addr_ton")
    source_addr_npi = cursor.octet("source_addr_npi")
    source_addr = cursor.c_octet_string(ADDRESS_MAX, "source_addr")
    dest_addr_ton = cursor.octet("dest_addr_ton")
    dest_addr_npi = cursor.octet("dest_addr_npi")
    destination_addr = cursor.c_octet_string(ADDRESS_MAX, "destination_addr")
    esm_class = cursor.octet("esm_class")
    protocol_id = cursor.octet("protocol_id")
    priority_flag = cursor.octet("priority_flag")
    schedule_delivery_time = cursor.c_octet_string(TIME_MAX, "schedule_delivery_time")
    validity_period = cursor.c_octet_string(TIME_MAX, "validity_period")
    registered_delivery = cursor.octet("registered_delivery")
    replace_if_present_flag = cursor.octet("replace_if_present_flag")
    data_coding = cursor.octet("data_coding")
    sm_default_msg_id = cursor.octet("sm_default_msg_id")
    sm_length = cursor.octet("sm_length")
    if sm_length > MAX_SHORT_MESSAGE_LENGTH:
        raise PduError(CommandStatus.ESME_RINVMSGLEN, f"sm_length {sm_length}")
    short_message = cursor.octets(sm_length, "short_message")
    return ShortMessage(
        service_type=service_type,
        source_addr_ton=source_addr_ton,
        source_addr_npi=source_addr_npi,
        source_addr=source_addr,
        dest_addr_ton=dest_addr_ton,
        dest_addr_npi=dest_addr_npi,
        destination_addr=destination_addr,
        esm_class=esm_class,
        protocol_id=protocol_id,
        priority_flag=priority_flag,
        schedule_delivery_time=schedule_delivery_time,
        validity_period=validity_period,
        registered_delivery=registered_delivery,
        replace_if_present_flag=replace_if_present_flag,
        data_coding=data_coding,
        sm_default_msg_id=sm_default_msg_id,
        short_message=short_message,
        tlvs=cursor.tlvs(),
    )


class Cursor:
    """Reads a PDU body front to back; every short read is a `PduError`."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._at = 0

    def octet(self, name: str) -> int:
        return self.octets(1, name)[0]

    def octets(self, count: int, name: str) -> bytes:
        end = self._at + count
        if end > len(self._data):
            raise PduError(CommandStatus.ESME_RINVMSGLEN, f"{name} runs past the end")
        value = self._data[self._at : end]
        self._at = end
        return value

    def c_octet_string(self, max_length: int, name: str) -> str:
        end = self._data.find(b"\x00", self._at, self._at + max_length)
        if end < 0:
            raise PduError(
                CommandStatus.ESME_RINVMSGLEN, f"{name} has no NUL within {max_length} octets"
            )
        value = self._data[self._at : end]
        self._at = end + 1
        # Latin-1 never fails: a stray 8-bit octet from an SMSC is kept, not fatal.
        return value.decode("latin-1")

    def tlvs(self) -> dict[int, bytes]:
        found: dict[int, bytes] = {}
        while self._at < len(self._data):
            if self._at + TLV_HEADER.size > len(self._data):
                raise PduError(CommandStatus.ESME_RINVOPTPARSTREAM, "truncated TLV header")
            tag, length = TLV_HEADER.unpack_from(self._data, self._at)
            self._at += TLV_HEADER.size
            if self._at + length > len(self._data):
                raise PduError(
                    CommandStatus.ESME_RINVOPTPARSTREAM, f"TLV 0x{tag:04X} runs past the end"
                )
            found[tag] = self._data[self._at : self._at + length]
            self._at += length
        return found

    def expect_end(self) -> None:
        if self._at != len(self._data):
            raise PduError(
                CommandStatus.ESME_RINVCMDLEN, f"{len(self._data) - self._at} octets left over"
            )


def tlv_c_octet_string(tlvs: Mapping[int, bytes], tag: int) -> str | None:
    value = tlvs.get(tag)
    if value is None:
        return None
    return value.split(b"\x00", 1)[0].decode("latin-1")


def tlv_integer(tlvs: Mapping[int, bytes], tag: int) -> int | None:
    value = tlvs.get(tag)
    return int.from_bytes(value, "big") if value else None


# -- text ------------------------------------------------------------------------------

# GSM 03.38 default alphabet, index = septet; 0x1B escapes to the extension table.
GSM7_BASIC = (
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞ\x1bÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENSION = {
    "\f": 0x0A,
    "^": 0x14,
    "{": 0x28,
    "}": 0x29,
    "\\": 0x2F,
    "[": 0x3C,
    "~": 0x3D,
    "]": 0x3E,
    "|": 0x40,
    "€": 0x65,
}
GSM7_ESCAPE = 0x1B
_GSM7_SEPTETS = {char: septet for septet, char in enumerate(GSM7_BASIC) if septet != GSM7_ESCAPE}
_GSM7_EXTENSION_CHARS = {septet: char for char, septet in GSM7_EXTENSION.items()}


def encode_gsm7(text: str) -> bytes | None:
    """The text in GSM 03.38 (unpacked, one septet per octet), or None if it does not fit."""
    out = bytearray()
    for char in text:
        septet = _GSM7_SEPTETS.get(char)
        if septet is not None:
            out.append(septet)
        elif char in GSM7_EXTENSION:
            out += bytes((GSM7_ESCAPE, GSM7_EXTENSION[char]))
        else:
            return None
    return bytes(out)


def decode_gsm7(data: bytes) -> str:
    chars: list[str] = []
    escaped = False
    for octet in data:
        septet = octet & 0x7F
        if escaped:
            # An unknown extension code shows the basic character (3GPP TS 23.038 §6.2.1.1).
            chars.append(_GSM7_EXTENSION_CHARS.get(septet, GSM7_BASIC[septet]))
            escaped = False
        elif septet == GSM7_ESCAPE:
            escaped = True
        else:
            chars.append(GSM7_BASIC[septet])
    return "".join(chars)


def encode_text(
    text: str, default_data_coding: int = DataCoding.SMSC_DEFAULT
) -> tuple[DataCoding, bytes]:
    """In the default alphabet (`default_data_coding`) when every character has a code
    there, else UCS-2 (UTF-16BE, so emoji survive)."""
    data_coding, units = text_units(text, default_data_coding)
    return data_coding, b"".join(encoded for encoded, _ in units)


def text_units(text: str, default_data_coding: int) -> tuple[DataCoding, list[tuple[bytes, int]]]:
    """Each character's octets and the room it takes in an SMS (septets in a 7-bit
    alphabet, octets otherwise): an escaped GSM character or a UTF-16 surrogate pair is
    one unit, never to be split across concatenated parts."""
    coding = DataCoding(default_data_coding)
    units: list[tuple[bytes, int]] = []
    for char in text:
        gsm7 = encode_gsm7(char)
        if coding is DataCoding.SMSC_DEFAULT and gsm7 is not None:
            units.append((gsm7, len(gsm7)))
        elif coding is DataCoding.IA5 and gsm7 is not None and char.isascii():
            # The SMSC sends IA5 as GSM 03.38 septets: only characters both share.
            units.append((char.encode("ascii"), len(gsm7)))
        elif coding is DataCoding.LATIN1 and ord(char) < 0x100:
            units.append((char.encode("latin-1"), 1))
        else:
            break
    else:
        return coding, units
    ucs2 = [char.encode("utf-16-be") for char in text]
    return DataCoding.UCS2, [(encoded, len(encoded)) for encoded in ucs2]


# Room in one SMS, and in each part of a concatenated one once the SMSC or we put the
# 6-octet UDH (IEI 0x00) in front: septets for 7-bit alphabets, octets for the others.
SMS_ROOM: Mapping[DataCoding, tuple[int, int]] = {
    DataCoding.SMSC_DEFAULT: (160, 153),
    DataCoding.IA5: (160, 153),
    DataCoding.LATIN1: (140, 134),
    DataCoding.UCS2: (140, 134),
}
MAX_PARTS = 255


def split_text(
    text: str, default_data_coding: int = DataCoding.SMSC_DEFAULT
) -> tuple[DataCoding, list[bytes]]:
    """The text's data_coding and its encoded parts: one when it fits a single SMS, else
    as many as concatenation needs (153 GSM septets, 67 UCS-2 characters each), cut
    between characters only."""
    data_coding, units = text_units(text, default_data_coding)
    single, part_room = SMS_ROOM[data_coding]
    if sum(room for _, room in units) <= single:
        return data_coding, [b"".join(encoded for encoded, _ in units)]
    parts: list[bytes] = []
    current, used = bytearray(), 0
    for encoded, room in units:
        if used + room > part_room:
            parts.append(bytes(current))
            current, used = bytearray(), 0
        current += encoded
        used += room
    parts.append(bytes(current))
    return data_coding, parts


def concatenation_udh(reference: int, total: int, number: int) -> bytes:
    """User data header of one part: IEI 0x00, concatenated SMS with an 8-bit reference."""
    return bytes((5, 0x00, 3, reference & 0xFF, total, number))


def decode_text(data_coding: int, data: bytes) -> str:
    if data_coding == DataCoding.UCS2:
        return data.decode("utf-16-be", errors="replace")
    if data_coding == DataCoding.SMSC_DEFAULT:
        return decode_gsm7(data)
    # 0x01 IA5/ASCII, 0x03 Latin-1 and anything else: receipts are plain ASCII in practice.
    return data.decode("latin-1")
