"""SMPP 3.4: the PDU codec against spec byte layouts, and SmppProvider against a
simulated SMSC over real TCP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from providers.base import (
    Accepted,
    Category,
    Channel,
    Content,
    InboundMessage,
    MalformedCallback,
    OutboundMessage,
    Provider,
    ProviderCallback,
    ReceiptStatus,
    Recipient,
    Rejected,
    StatusUpdate,
    TransientProviderError,
)
from providers.smpp import (
    SmppConfig,
    SmppProvider,
    Submitted,
    SubmittedMessages,
    classify_submit_response,
    message_id_forms,
    mobile_originated,
    parse_delivery_receipt,
    receipt_fields,
    relative_validity_period,
)
from providers.smpp_pdu import (
    Bind,
    BindResp,
    CancelSm,
    CommandId,
    CommandStatus,
    DataCoding,
    EsmClass,
    MessageIdResp,
    Pdu,
    PduError,
    ShortMessage,
    Tag,
    decode_pdu,
    decode_text,
    encode_pdu,
    encode_text,
    read_frame,
)
from tests.simulators.smpp import SimulatedNumber, SmscSimulator

SYSTEM_ID = "cascade"
PASSWORD = "secret"
SENDER = "+15557654321"
MARKETING_SENDER = "CascadeNews"


class StatusRecorder:
    """The `on_status` callback: keeps every update; can be told to fail."""

    def __init__(self) -> None:
        self.updates: list[StatusUpdate] = []
        self.fail = False
        self._changed = asyncio.Condition()

    async def __call__(self, update: StatusUpdate) -> None:
        if self.fail:
            raise RuntimeError("ledger unavailable")
        async with self._changed:
            self.updates.append(update)
            self._changed.notify_all()

    async def wait_for(self, count: int) -> list[StatusUpdate]:
        async with self._changed, asyncio.timeout(5):
            await self._changed.wait_for(lambda: len(self.updates) >= count)
        return self.updates


@pytest.fixture(scope="module")
async def running_smsc() -> AsyncIterator[SmscSimulator]:
    async with SmscSimulator(system_id=SYSTEM_ID, password=PASSWORD) as simulator:
        yield simulator


@pytest.fixture
def smsc(running_smsc: SmscSimulator) -> SmscSimulator:
    running_smsc.reset()
    return running_smsc


@pytest.fixture
def statuses() -> StatusRecorder:
    return StatusRecorder()


def make_config(smsc: SmscSimulator, **overrides: Any) -> SmppConfig:
    fields: dict[str, Any] = {
        "host": smsc.host,
        "port": smsc.port,
        "system_id": SYSTEM_ID,
        "password": PASSWORD,
        "source_addr": SENDER,
        "source_addr_by_category": {"marketing": MARKETING_SENDER},
        "connect_timeout": 2,
        "response_timeout": 2,
        "rebind_backoff_initial": 0.01,
        "rebind_backoff_max": 0.05,
    }
    return SmppConfig.model_validate(fields | overrides)


@pytest.fixture
async def provider(smsc: SmscSimulator, statuses: StatusRecorder) -> AsyncIterator[SmppProvider]:
    adapter = SmppProvider(make_config(smsc), on_status=statuses)
    yield adapter
    await adapter.aclose()


def sms(
    to: str,
    *,
    text: str | None = "Your code is 123456",
    attempt_id: str = "att_1",
    category: Category = Category.TRANSACTIONAL,
    timeout_seconds: int = 120,
) -> OutboundMessage:
    return OutboundMessage(
        message_id="msg_1",
        attempt_id=attempt_id,
        category=category,
        channel=Channel.SMS,
        address=to,
        content=Content(text=text),
        timeout_seconds=timeout_seconds,
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# -- codec -----------------------------------------------------------------------------


def test_bind_transmitter_matches_the_example_pdu_of_the_specification() -> None:
    frame = bytes.fromhex(
        "0000002F 00000002 00000000 00000001"  # length 47, bind_transmitter, ROK, seq 1
        "534D5050335445535400"  # system_id "SMPP3TEST"
        "7365637265743038 00"  # password "secret08"
        "5355424D49543100"  # system_type "SUBMIT1"
        "50 01 01 00"  # interface_version, addr_ton, addr_npi, address_range ""
    )
    pdu = decode_pdu(frame)

    assert pdu == Pdu(
        CommandId.BIND_TRANSMITTER,
        1,
        0,
        Bind("SMPP3TEST", "secret08", "SUBMIT1", interface_version=0x50, addr_ton=1, addr_npi=1),
    )
    assert encode_pdu(pdu) == frame


def test_header_only_pdus_are_sixteen_octets() -> None:
    enquire_link = bytes.fromhex("00000010 00000015 00000000 00000007")
    assert decode_pdu(enquire_link) == Pdu(CommandId.ENQUIRE_LINK, 7)
    assert encode_pdu(Pdu(CommandId.ENQUIRE_LINK_RESP, 7)) == bytes.fromhex(
        "00000010 80000015 00000000 00000007"
    )
    assert encode_pdu(Pdu(CommandId.GENERIC_NACK, 3, CommandStatus.ESME_RINVCMDID)) == (
        bytes.fromhex("00000010 80000000 00000003 00000003")
    )


def test_submit_sm_is_laid_out_field_by_field_as_section_4_4_1() -> None:
    submit = ShortMessage(
        source_addr_ton=5,
        source_addr=MARKETING_SENDER,
        dest_addr_ton=1,
        dest_addr_npi=1,
        destination_addr="15550100001",
        validity_period="000000000200000R",
        registered_delivery=1,
        short_message=b"Hi",
        tlvs={Tag.USER_MESSAGE_REFERENCE: b"\x00\x2a"},
    )
    body = bytes.fromhex(
        "00"  # service_type ""
        "05 00" + MARKETING_SENDER.encode().hex() + "00"  # source ton, npi, addr
        "01 01" + b"15550100001".hex() + "00"  # dest ton, npi, addr
        "00 00 00"  # esm_class, protocol_id, priority_flag
        "00" + b"000000000200000R".hex() + "00"  # schedule_delivery_time, validity_period
        "01 00 00 00"  # registered_delivery, replace_if_present, data_coding, sm_default_msg_id
        "02 4869"  # sm_length, short_message "Hi"
        "0204 0002 002a"  # TLV user_message_reference = 42
    )
    header = (16 + len(body)).to_bytes(4) + bytes.fromhex("00000004 00000000 00000009")

    frame = encode_pdu(Pdu(CommandId.SUBMIT_SM, 9, 0, submit))

    assert frame == header + body
    assert decode_pdu(frame) == Pdu(CommandId.SUBMIT_SM, 9, 0, submit)


def test_deliver_sm_receipt_decodes_with_its_tlvs() -> None:
    text = (
        b"id:B2D05E00 sub:001 dlvrd:001 submit date:2401011200 done date:2401011201"
        b" stat:DELIVRD err:000 text:Hi"
    )
    body = (
        b"\x00"  # service_type
        + b"\x01\x0115550100001\x00"  # the handset
        + b"\x01\x0115557654321\x00"  # our sender
        + b"\x04\x00\x00"  # esm_class: SMSC delivery receipt
        + b"\x00\x00"  # no schedule, no validity
        + b"\x00\x00\x00\x00"
        + bytes((len(text),))
        + text
        + bytes.fromhex("001E 0009")
        + b"B2D05E00\x00"  # receipted_message_id
        + bytes.fromhex("0427 0001 02")  # message_state DELIVERED
    )
    frame = (16 + len(body)).to_bytes(4) + bytes.fromhex("00000005 00000000 0000002A") + body

    pdu = decode_pdu(frame)

    assert isinstance(pdu.body, ShortMessage)
    assert pdu.body.esm_class == 0x04
    assert pdu.body.short_message == text
    assert pdu.body.tlvs == {Tag.RECEIPTED_MESSAGE_ID: b"B2D05E00\x00", Tag.MESSAGE_STATE: b"\x02"}
    assert encode_pdu(pdu) == frame


def test_responses_round_trip_and_may_omit_their_body_on_error() -> None:
    accepted = Pdu(CommandId.SUBMIT_SM_RESP, 4, 0, MessageIdResp("B2D05E00"))
    assert encode_pdu(accepted) == bytes.fromhex("00000019 80000004 00000000 00000004") + (
        b"B2D05E00\x00"
    )
    assert decode_pdu(encode_pdu(accepted)) == accepted

    refused = bytes.fromhex("00000010 80000004 00000058 00000005")
    assert decode_pdu(refused) == Pdu(CommandId.SUBMIT_SM_RESP, 5, CommandStatus.ESME_RTHROTTLED)

    bound = Pdu(CommandId.BIND_TRANSCEIVER_RESP, 1, 0, BindResp("SMSC", {0x0210: b"\x34"}))
    assert decode_pdu(encode_pdu(bound)) == bound


@pytest.mark.parametrize(
    ("frame", "status", "sequence_number"),
    [
        ("00000010 00000099 00000000 00000003", CommandStatus.ESME_RINVCMDID, 3),
        ("00000011 00000015 00000000 00000004", CommandStatus.ESME_RINVCMDLEN, 4),
        ("00000014 00000015 00000000 00000004 00000000", CommandStatus.ESME_RINVCMDLEN, 4),
        ("00000014 80000004 00000000 00000006 41424344", CommandStatus.ESME_RINVMSGLEN, 6),
        (
            "00000015 80000009 00000000 00000001 4100 0210 00",
            CommandStatus.ESME_RINVOPTPARSTREAM,
            1,
        ),
        ("0000000C 00000015 00000000", CommandStatus.ESME_RINVCMDLEN, None),
    ],
    ids=[
        "unknown-command",
        "length-mismatch",
        "header-only-with-body",
        "no-nul",
        "cut-tlv",
        "short",
    ],
)
def test_broken_pdus_are_refused_with_the_status_to_answer(
    frame: str, status: int, sequence_number: int | None
) -> None:
    with pytest.raises(PduError) as raised:
        decode_pdu(bytes.fromhex(frame))
    assert raised.value.status == status
    assert raised.value.sequence_number == sequence_number


async def test_an_impossible_command_length_breaks_the_stream() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(bytes.fromhex("00000008 00000015"))
    with pytest.raises(PduError) as raised:
        await read_frame(reader)
    assert raised.value.sequence_number is None


def test_text_is_gsm7_when_it_can_be_and_ucs2_otherwise() -> None:
    assert encode_text("Price: 5€ [ok]") == (
        DataCoding.SMSC_DEFAULT,
        b"Price: 5\x1b\x65 \x1b\x3cok\x1b\x3e",
    )
    assert encode_text("@£ Ä") == (DataCoding.SMSC_DEFAULT, b"\x00\x01\x20\x5b")
    assert encode_text("Код 42") == (DataCoding.UCS2, "Код 42".encode("utf-16-be"))


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=80))
def test_any_text_survives_encoding(text: str) -> None:
    assert decode_text(*encode_text(text)) == text


@settings(max_examples=60, deadline=None)
@given(
    source=st.text("0123456789", min_size=1, max_size=20),
    destination=st.text("0123456789", min_size=1, max_size=20),
    message=st.binary(max_size=254),
    payload=st.binary(max_size=600),
    sequence_number=st.integers(1, 0x7FFFFFFF),
)
def test_short_messages_round_trip(
    source: str, destination: str, message: bytes, payload: bytes, sequence_number: int
) -> None:
    pdu = Pdu(
        CommandId.DELIVER_SM,
        sequence_number,
        0,
        ShortMessage(
            source_addr=source,
            destination_addr=destination,
            short_message=message,
            tlvs={Tag.MESSAGE_PAYLOAD: payload},
        ),
    )
    assert decode_pdu(encode_pdu(pdu)) == pdu


# -- pure adapter parts ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "transient"),
    [
        (CommandStatus.ESME_RTHROTTLED, True),
        (CommandStatus.ESME_RMSGQFUL, True),
        (CommandStatus.ESME_RSYSERR, True),
        (CommandStatus.ESME_RINVBNDSTS, True),
        (CommandStatus.ESME_RX_T_APPN, True),
        (CommandStatus.ESME_RINVDSTADR, False),
        (CommandStatus.ESME_RINVSRCADR, False),
        (CommandStatus.ESME_RSUBMITFAIL, False),
        (CommandStatus.ESME_RINVSCHED, False),
        (CommandStatus.ESME_RINVEXPIRY, False),
        (CommandStatus.ESME_RUNKNOWNERR, False),
        (0x400, False),  # vendor-specific range
    ],
)
def test_submit_statuses_are_classified(status: int, transient: bool) -> None:
    response = Pdu(CommandId.SUBMIT_SM_RESP, 1, status)
    if transient:
        with pytest.raises(TransientProviderError) as raised:
            classify_submit_response(response)
        assert raised.value.code == f"smpp:0x{status:08X}"
    else:
        assert classify_submit_response(response) == Rejected(
            code=f"smpp:0x{status:08X}", detail=raised_name(status)
        )


def raised_name(status: int) -> str:
    try:
        return CommandStatus(status).name
    except ValueError:
        return f"0x{status:08X}"


def test_receipt_text_fields_are_read_whatever_the_text_holds() -> None:
    text = (
        "id:0123456789 sub:001 dlvrd:000 submit date:2401011200 done date:2401011205"
        " stat:UNDELIV err:001 Text:see id:9 stat:DELIVRD"
    )
    assert receipt_fields(text) == {
        "id": "0123456789",
        "sub": "001",
        "dlvrd": "000",
        "submit date": "2401011200",
        "done date": "2401011205",
        "stat": "UNDELIV",
        "err": "001",
        "text": "see id:9 stat:DELIVRD",
    }


def test_receipt_tlvs_win_over_the_text() -> None:
    body = ShortMessage(
        esm_class=0x04,
        short_message=b"id:1234 sub:001 dlvrd:001 submit date:2401011200 done date:2401011201"
        b" stat:DELIVRD err:000 text:",
        tlvs={Tag.RECEIPTED_MESSAGE_ID: b"4D2\x00", Tag.MESSAGE_STATE: b"\x05"},
    )
    receipt = parse_delivery_receipt(body)
    assert receipt is not None
    assert (receipt.message_id, receipt.stat, receipt.err) == ("4D2", "UNDELIV", "000")

    assert parse_delivery_receipt(ShortMessage(esm_class=0x04, short_message=b"garbage")) is None


def test_message_ids_match_in_hex_and_decimal_readings() -> None:
    assert message_id_forms("B2D05E00") == ["b2d05e00", "3000000000"]
    assert message_id_forms("3000000000") == ["3000000000", "b2d05e00", str(0x3000000000)]
    submitted = SubmittedMessages(capacity=2)
    submitted.remember(Submitted("att_1", "B2D05E00", ("B2D05E00",), CancelSm()))
    submitted.remember(Submitted("att_2", "41", ("40", "41"), CancelSm()))  # two parts

    assert submitted.find("3000000000") == submitted.find("b2d05e00")
    found = submitted.find("3000000000")
    assert found is not None and found.submitted.attempt_id == "att_1" and found.decides
    assert submitted.find("0041") is not None  # leading zeros
    first_part = submitted.find("40")
    assert first_part is not None and first_part.submitted.attempt_id == "att_2"
    assert (first_part.index, first_part.decides) == (0, False)

    submitted.remember(Submitted("att_3", "43", ("43",), CancelSm()))  # evicts the oldest
    assert submitted.find("B2D05E00") is None
    assert submitted.find("40") is not None and submitted.find("43") is not None


def test_validity_period_is_the_step_timeout_in_relative_format() -> None:
    assert relative_validity_period(120) == "000000000200000R"
    assert relative_validity_period(2 * 86_400 + 3 * 3600 + 4 * 60 + 5) == "000002030405000R"
    assert relative_validity_period(10**9) == "000099235959000R"


def test_config_refuses_what_smpp_3_4_cannot_carry(smsc: SmscSimulator) -> None:
    with pytest.raises(pydantic.ValidationError, match="at most 8"):
        make_config(smsc, password="much-too-long")
    with pytest.raises(pydantic.ValidationError, match="longer than 11"):
        make_config(smsc, source_addr_by_category={"marketing": "WayTooLongSender"})
    with pytest.raises(pydantic.ValidationError, match="receipt_timezone"):
        make_config(smsc, receipt_timezone="Mars/Olympus_Mons")


# -- against the simulated SMSC --------------------------------------------------------


async def test_provider_implements_the_interface(provider: SmppProvider) -> None:
    assert isinstance(provider, Provider)
    assert provider.channel is Channel.SMS
    assert provider.address(Recipient(phone="+15550100001")) == "+15550100001"
    assert provider.address(Recipient(email="a@example.com")) is None
    with pytest.raises(MalformedCallback):
        await provider.parse_status(ProviderCallback("POST", "http://x/", {}, b""))


async def test_send_binds_a_transceiver_and_is_accepted_with_the_smsc_message_id(
    smsc: SmscSimulator, provider: SmppProvider
) -> None:
    result = await provider.send(sms(SimulatedNumber.DELIVERED))

    [submit] = smsc.submits
    assert result == Accepted(provider_message_id=submit.message_id or "", segments=1)
    [bind] = smsc.binds
    assert (bind.command_id, bind.system_id, bind.password, bind.interface_version) == (
        CommandId.BIND_TRANSCEIVER,
        SYSTEM_ID,
        PASSWORD,
        0x34,
    )
    pdu = submit.pdu
    assert (pdu.source_addr_ton, pdu.source_addr_npi, pdu.source_addr) == (1, 1, "15557654321")
    assert (pdu.dest_addr_ton, pdu.dest_addr_npi, pdu.destination_addr) == (1, 1, "15550100001")
    assert (pdu.registered_delivery, pdu.data_coding) == (1, DataCoding.SMSC_DEFAULT)
    assert pdu.validity_period == "000000000200000R"
    assert submit.text == "Your code is 123456"


async def test_marketing_goes_from_its_alphanumeric_sender(
    smsc: SmscSimulator, provider: SmppProvider
) -> None:
    result = await provider.send(sms(SimulatedNumber.NO_RECEIPT, category=Category.MARKETING))

    assert isinstance(result, Accepted)
    [submit] = smsc.submits
    assert (submit.pdu.source_addr_ton, submit.pdu.source_addr_npi) == (5, 0)
    assert submit.pdu.source_addr == MARKETING_SENDER


async def test_text_outside_gsm7_goes_as_ucs2(smsc: SmscSimulator, provider: SmppProvider) -> None:
    await provider.send(sms(SimulatedNumber.NO_RECEIPT, text="Ваш код 123456 🙂"))

    [submit] = smsc.submits
    assert submit.pdu.data_coding == DataCoding.UCS2
    assert submit.text == "Ваш код 123456 🙂"


async def test_a_long_text_goes_whole_in_message_payload_when_the_account_says_so(
    smsc: SmscSimulator,
) -> None:
    text = "Your appointment is confirmed. " * 10  # 310 septets, more than one SMS
    adapter = SmppProvider(make_config(smsc, long_messages="message_payload"))
    try:
        result = await adapter.send(sms(SimulatedNumber.NO_RECEIPT, text=text))
    finally:
        await adapter.aclose()

    assert isinstance(result, Accepted) and result.segments == 3  # as the SMSC will split it

    [submit] = smsc.submits
    assert submit.pdu.short_message == b""
    assert Tag.MESSAGE_PAYLOAD in submit.pdu.tlvs
    assert submit.text == text


async def test_a_message_that_cannot_be_an_sms_is_rejected_without_a_submit(
    smsc: SmscSimulator, provider: SmppProvider
) -> None:
    assert await provider.send(sms(SimulatedNumber.DELIVERED, text=None)) == Rejected(
        code="smpp:missing_body", detail="SMS needs content.text"
    )
    result = await provider.send(sms("+1555-CALL-NOW"))
    assert isinstance(result, Rejected) and result.code == "smpp:invalid_address"
    assert smsc.submits == []
    assert smsc.binds == []


@pytest.mark.parametrize(
    ("number", "code"),
    [
        (SimulatedNumber.THROTTLED, "smpp:0x00000058"),
        (SimulatedNumber.QUEUE_FULL, "smpp:0x00000014"),
        (SimulatedNumber.SYSTEM_ERROR, "smpp:0x00000008"),
    ],
)
async def test_smsc_overload_is_transient(
    smsc: SmscSimulator, provider: SmppProvider, number: str, code: str
) -> None:
    with pytest.raises(TransientProviderError) as raised:
        await provider.send(sms(number))
    assert raised.value.code == code
    assert raised.value.provider_fault


@pytest.mark.parametrize(
    ("number", "code", "detail"),
    [
        (SimulatedNumber.INVALID_DESTINATION, "smpp:0x0000000B", "ESME_RINVDSTADR"),
        (SimulatedNumber.SUBMIT_FAILED, "smpp:0x00000045", "ESME_RSUBMITFAIL"),
    ],
)
async def test_refused_submits_are_rejected(
    smsc: SmscSimulator, provider: SmppProvider, number: str, code: str, detail: str
) -> None:
    assert await provider.send(sms(number)) == Rejected(code=code, detail=detail)


async def test_an_invalid_sender_is_rejected_by_the_smsc(
    smsc: SmscSimulator, statuses: StatusRecorder
) -> None:
    # A numeric TON forced onto an alphanumeric sender: the SMSC refuses the source address.
    adapter = SmppProvider(
        make_config(smsc, source_addr="Cascade", source_addr_ton=1, source_addr_npi=1)
    )
    try:
        assert await adapter.send(sms(SimulatedNumber.DELIVERED)) == Rejected(
            code="smpp:0x0000000A", detail="ESME_RINVSRCADR"
        )
    finally:
        await adapter.aclose()


async def test_no_submit_sm_resp_in_time_is_transient(smsc: SmscSimulator) -> None:
    adapter = SmppProvider(make_config(smsc, response_timeout=0.2))
    try:
        with pytest.raises(TransientProviderError) as raised:
            await adapter.send(sms(SimulatedNumber.NO_RESPONSE))
        assert raised.value.code == "smpp:timeout"
        assert len(smsc.submits_to(SimulatedNumber.NO_RESPONSE)) == 1
    finally:
        await adapter.aclose()


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        ({"password": "wrong"}, "smpp:0x0000000E"),
        ({"system_id": "someone"}, "smpp:0x0000000F"),
        ({}, "smpp:0x0000000D"),
    ],
    ids=["invalid-password", "invalid-system-id", "bind-refused"],
)
async def test_a_refused_bind_is_transient_and_backs_off(
    smsc: SmscSimulator, overrides: dict[str, str], code: str
) -> None:
    smsc.refuse_binds = not overrides
    adapter = SmppProvider(make_config(smsc, rebind_backoff_initial=30, **overrides))
    try:
        with pytest.raises(TransientProviderError) as first:
            await adapter.send(sms(SimulatedNumber.DELIVERED))
        assert first.value.code == code
        assert "bind_transceiver refused" in first.value.detail

        # Inside the backoff the send fails at once, without hammering the SMSC.
        with pytest.raises(TransientProviderError) as second:
            await adapter.send(sms(SimulatedNumber.DELIVERED))
        assert second.value.code == code
        assert second.value.retry_after is not None and second.value.retry_after > 0
        assert len(smsc.binds) == 1
        assert smsc.submits == []
    finally:
        await adapter.aclose()


async def test_an_unreachable_smsc_is_transient(smsc: SmscSimulator) -> None:
    adapter = SmppProvider(make_config(smsc, port=free_port()))
    try:
        with pytest.raises(TransientProviderError) as raised:
            await adapter.send(sms(SimulatedNumber.DELIVERED))
        assert raised.value.code == "smpp:connect"
    finally:
        await adapter.aclose()


async def test_a_delivery_receipt_becomes_a_delivered_status_for_the_attempt(
    smsc: SmscSimulator, provider: SmppProvider, statuses: StatusRecorder
) -> None:
    result = await provider.send(sms(SimulatedNumber.DELIVERED, attempt_id="att_delivered"))
    assert isinstance(result, Accepted)

    [update] = await statuses.wait_for(1)

    message_id = result.provider_message_id
    assert update.status is ReceiptStatus.DELIVERED
    assert update.provider_message_id == message_id
    assert update.attempt_id == "att_delivered"
    assert update.event_id == f"{message_id}:DELIVRD"
    assert update.error_code is None
    assert update.occurred_at is not None
    await smsc.wait_until(lambda: smsc.receipts[0].response_status is not None)
    assert smsc.receipts[0].response_status == CommandStatus.ESME_ROK


@pytest.mark.parametrize(
    ("number", "error_code", "stat"),
    [
        (SimulatedNumber.UNDELIVERED, "smpp:UNDELIV:001", "UNDELIV"),
        (SimulatedNumber.EXPIRED, "smpp:EXPIRED", "EXPIRED"),
        (SimulatedNumber.REJECTED, "smpp:REJECTD:002", "REJECTD"),
    ],
)
async def test_failure_receipts_become_failed_statuses_with_the_smsc_error(
    provider: SmppProvider, statuses: StatusRecorder, number: str, error_code: str, stat: str
) -> None:
    result = await provider.send(sms(number))
    assert isinstance(result, Accepted)

    [update] = await statuses.wait_for(1)

    assert update.status is ReceiptStatus.FAILED
    assert update.error_code == error_code
    assert update.event_id == f"{result.provider_message_id}:{stat}"
    assert update.attempt_id == "att_1"
    assert update.error_detail is not None and stat in update.error_detail


async def test_an_undelivered_receipt_carries_the_network_error(
    provider: SmppProvider, statuses: StatusRecorder
) -> None:
    await provider.send(sms(SimulatedNumber.UNDELIVERED))
    [update] = await statuses.wait_for(1)
    assert update.error_detail == "SMSC reported UNDELIV, err 001, network_error_code 030001"


async def test_a_text_only_receipt_with_a_decimal_id_matches_the_hex_submit(
    smsc: SmscSimulator, provider: SmppProvider, statuses: StatusRecorder
) -> None:
    smsc.receipt_ids = "decimal"
    smsc.receipt_tlvs = False

    result = await provider.send(sms(SimulatedNumber.DELIVERED, attempt_id="att_hex"))
    [update] = await statuses.wait_for(1)

    assert isinstance(result, Accepted)
    assert smsc.receipts[0].message_id == str(int(result.provider_message_id, 16))
    assert update.provider_message_id == result.provider_message_id
    assert update.attempt_id == "att_hex"
    assert update.status is ReceiptStatus.DELIVERED


async def test_a_receipt_sent_before_the_submit_sm_resp_still_carries_the_attempt(
    smsc: SmscSimulator, provider: SmppProvider, statuses: StatusRecorder
) -> None:
    result = await provider.send(
        sms(SimulatedNumber.RECEIPT_BEFORE_RESPONSE, attempt_id="att_early")
    )
    [update] = await statuses.wait_for(1)

    assert isinstance(result, Accepted)
    message_id = result.provider_message_id
    assert update.attempt_id == "att_early"
    assert update.provider_message_id == message_id
    await smsc.wait_until(lambda: f"deliver_sm_resp {message_id}" in smsc.events)
    assert smsc.events == [
        f"deliver_sm {message_id}",
        f"submit_sm_resp {message_id}",
        f"deliver_sm_resp {message_id}",
    ]


async def test_a_held_receipt_whose_id_never_maps_is_passed_on_after_the_hold(
    smsc: SmscSimulator, statuses: StatusRecorder
) -> None:
    adapter = SmppProvider(
        make_config(smsc, receipt_hold_seconds=0.05, response_timeout=5), on_status=statuses
    )
    try:
        # A submit waits for its response, so an unknown receipt is held, then let go.
        pending = asyncio.create_task(adapter.send(sms(SimulatedNumber.NO_RESPONSE)))
        await smsc.wait_until(lambda: len(smsc.submits) == 1)
        await smsc.send_receipt("FFFF0001", "DELIVRD")

        [update] = await statuses.wait_for(1)

        assert update.provider_message_id == "FFFF0001"
        assert update.attempt_id is None
        assert not pending.done()
        pending.cancel()
    finally:
        await adapter.aclose()


async def test_a_receipt_for_another_process_is_matched_by_canonical_id_after_a_rebind(
    smsc: SmscSimulator, statuses: StatusRecorder
) -> None:
    config = make_config(smsc, hex_message_ids="submit_sm_resp")
    sender = SmppProvider(config)
    result = await sender.send(sms(SimulatedNumber.NO_RECEIPT))
    await sender.aclose()
    [submit] = smsc.submits
    assert submit.message_id is not None
    # Ids are reported in decimal when the SMSC answers submits in hex.
    assert result == Accepted(provider_message_id=str(int(submit.message_id, 16)), segments=1)

    # Its receipts give the id in decimal. The SMSC keeps this one until someone binds
    # again: here another worker, which never saw the submit.
    await smsc.send_receipt(str(int(submit.message_id, 16)), "DELIVRD")
    receiver = SmppProvider(config, on_status=statuses)
    try:
        await receiver.start()
        [update] = await statuses.wait_for(1)
    finally:
        await receiver.aclose()
    assert update.provider_message_id == result.provider_message_id
    assert update.attempt_id is None


async def test_a_receipt_the_ledger_could_not_take_is_refused_for_redelivery(
    smsc: SmscSimulator, provider: SmppProvider, statuses: StatusRecorder
) -> None:
    statuses.fail = True

    await provider.send(sms(SimulatedNumber.DELIVERED))

    await smsc.wait_until(
        lambda: bool(smsc.receipts) and smsc.receipts[0].response_status is not None
    )
    assert smsc.receipts[0].response_status == CommandStatus.ESME_RX_T_APPN


async def test_the_smscs_enquire_link_is_answered(
    smsc: SmscSimulator, provider: SmppProvider
) -> None:
    await provider.start()
    await smsc.wait_until(lambda: len(smsc.bound_sessions) == 1)

    response = await smsc.enquire_link()

    assert (response.command_id, response.command_status) == (CommandId.ENQUIRE_LINK_RESP, 0)


async def test_the_provider_sends_its_own_enquire_link(smsc: SmscSimulator) -> None:
    adapter = SmppProvider(make_config(smsc, enquire_link_interval=0.02))
    try:
        await adapter.start()
        await smsc.wait_until(lambda: smsc.enquire_links_received >= 3)
    finally:
        await adapter.aclose()


async def test_after_a_dropped_connection_it_binds_again_and_the_next_send_works(
    smsc: SmscSimulator, provider: SmppProvider, statuses: StatusRecorder
) -> None:
    assert isinstance(await provider.send(sms(SimulatedNumber.NO_RECEIPT)), Accepted)

    await smsc.drop_connections()
    await smsc.wait_until(lambda: len(smsc.binds) == 2 and len(smsc.bound_sessions) == 1)

    result = await provider.send(sms(SimulatedNumber.DELIVERED, attempt_id="att_after"))
    assert isinstance(result, Accepted)
    [update] = await statuses.wait_for(1)
    assert update.attempt_id == "att_after"
    assert smsc.binds[1].session != smsc.binds[0].session


async def test_concurrent_sends_keep_to_the_window(smsc: SmscSimulator) -> None:
    smsc.response_delay_seconds = 0.02
    adapter = SmppProvider(make_config(smsc, window_size=2))
    try:
        results = await asyncio.gather(
            *(
                adapter.send(sms(SimulatedNumber.NO_RECEIPT, attempt_id=f"att_{n}"))
                for n in range(6)
            )
        )
    finally:
        await adapter.aclose()

    assert all(isinstance(r, Accepted) for r in results)
    assert len({r.provider_message_id for r in results if isinstance(r, Accepted)}) == 6
    assert smsc.max_in_flight == 2
    assert len({s.sequence_number for s in smsc.submits}) == 6


async def test_aclose_unbinds(smsc: SmscSimulator) -> None:
    adapter = SmppProvider(make_config(smsc))
    await adapter.send(sms(SimulatedNumber.NO_RECEIPT))

    await adapter.aclose()

    assert smsc.unbinds_received == 1
    with pytest.raises(TransientProviderError):
        await adapter.send(sms(SimulatedNumber.NO_RECEIPT))


async def test_sends_fail_fast_while_it_waits_to_bind_again(smsc: SmscSimulator) -> None:
    adapter = SmppProvider(make_config(smsc, rebind_backoff_initial=30))
    try:
        assert isinstance(await adapter.send(sms(SimulatedNumber.NO_RECEIPT)), Accepted)
        await smsc.drop_connections()

        with pytest.raises(TransientProviderError) as raised:
            await adapter.send(sms(SimulatedNumber.NO_RECEIPT))

        assert raised.value.code == "smpp:connection_lost"
        assert len(smsc.binds) == 1
    finally:
        await adapter.aclose()


# --- mobile-originated messages --------------------------------------------------------


class InboundRecorder:
    """The `on_inbound` callback: keeps every message; can be told to fail."""

    def __init__(self) -> None:
        self.messages: list[InboundMessage] = []
        self.fail = False

    async def __call__(self, message: InboundMessage) -> None:
        if self.fail:
            raise RuntimeError("ledger unavailable")
        self.messages.append(message)


async def bound_with_inbound(smsc: SmscSimulator, inbound: InboundRecorder) -> SmppProvider:
    adapter = SmppProvider(make_config(smsc), on_inbound=inbound)
    await adapter.start()
    await smsc.wait_until(lambda: len(smsc.bound_sessions) == 1)
    return adapter


@pytest.mark.parametrize(
    ("text", "in_payload", "data_coding"),
    [
        ("STOP", False, DataCoding.SMSC_DEFAULT),
        ("Za 10 minut, dziękuję!", False, DataCoding.SMSC_DEFAULT),  # UCS-2
        ("Running late", True, DataCoding.SMSC_DEFAULT),
        ("Running late", False, DataCoding.LATIN1),
    ],
)
async def test_a_deliver_sm_without_receipt_bits_is_a_reply_from_the_handset(
    smsc: SmscSimulator, text: str, in_payload: bool, data_coding: int
) -> None:
    inbound = InboundRecorder()
    adapter = await bound_with_inbound(smsc, inbound)
    try:
        answer = await smsc.send_mo(
            "+48600100200", text, to="4790", in_payload=in_payload, data_coding=data_coding
        )
    finally:
        await adapter.aclose()

    assert answer == CommandStatus.ESME_ROK
    [message] = inbound.messages
    assert (message.channel, message.sender, message.to, message.text) == (
        Channel.SMS,
        "+48600100200",
        "4790",
        text,
    )
    assert message.event_id.startswith("mo:")


async def test_the_same_mo_delivered_again_has_the_same_event_id(smsc: SmscSimulator) -> None:
    inbound = InboundRecorder()
    adapter = await bound_with_inbound(smsc, inbound)
    try:
        for text in ("STOP", "STOP", "START"):
            await smsc.send_mo("+48600100200", text)
    finally:
        await adapter.aclose()

    first, again, other = (m.event_id for m in inbound.messages)
    assert first == again != other


async def test_an_mo_the_ledger_could_not_take_is_refused_for_redelivery(
    smsc: SmscSimulator,
) -> None:
    inbound = InboundRecorder()
    inbound.fail = True
    adapter = await bound_with_inbound(smsc, inbound)
    try:
        answer = await smsc.send_mo("+48600100200", "STOP")
    finally:
        await adapter.aclose()

    assert answer == CommandStatus.ESME_RX_T_APPN


def test_a_concatenated_parts_header_is_cut_off() -> None:
    udh = bytes((5, 0x00, 3, 7, 2, 1))
    body = ShortMessage(
        source_addr_ton=1,
        source_addr="48600100200",
        destination_addr="Cascade",
        esm_class=EsmClass.UDH_INDICATOR,
        short_message=udh + encode_text("Hello")[1],
    )

    message = mobile_originated(body, datetime.now(UTC))

    assert message is not None and message.text == "Hello"


def test_a_national_sender_is_kept_as_given_and_an_empty_mo_is_none() -> None:
    national = ShortMessage(source_addr_ton=2, source_addr="600100200", short_message=b"hi")

    message = mobile_originated(national, datetime.now(UTC))

    assert message is not None and message.sender == "600100200"
    assert mobile_originated(ShortMessage(source_addr="1"), datetime.now(UTC)) is None
