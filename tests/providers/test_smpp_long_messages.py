"""SMPP long messages (UDH and SAR concatenation, message_payload), the default alphabet's
data_coding and cancel_sm, checked with an independent decoder: smpplib parses the PDUs
the simulated SMSC received off the wire and its GSM 03.38 table reads the septets;
the user data header is read here by 3GPP TS 23.040 §9.2.3.24, not by our codec."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
import smpplib.command
import smpplib.gsm
import smpplib.smpp
from hypothesis import given
from hypothesis import strategies as st

from providers.base import Accepted, ReceiptStatus, Rejected, TransientProviderError
from providers.smpp import SmppProvider
from providers.smpp_pdu import CommandStatus, DataCoding, split_text
from tests.providers.test_smpp import StatusRecorder, make_config, sms
from tests.simulators.smpp import RecordedSubmit, SimulatedNumber, SmscSimulator

UDHI = 0x40
# '€' and '{' are two septets (escape + code): each sits where a part is full.
LONG_GSM = "x" * 152 + "€" + "y" * 150 + "{}" + "z" * 20 + " [end]"
# '🙂' and '👍🏽' are surrogate pairs: each sits where a part is full.
LONG_UCS2 = "Ж" * 66 + "🙂" + "Ё" * 65 + "👍🏽" + "Ваш код 123456"


@pytest.fixture(scope="module")
async def running_smsc() -> AsyncIterator[SmscSimulator]:
    async with SmscSimulator(system_id="cascade", password="secret") as simulator:
        yield simulator


@pytest.fixture
def smsc(running_smsc: SmscSimulator) -> SmscSimulator:
    running_smsc.reset()
    return running_smsc


@pytest.fixture
def statuses() -> StatusRecorder:
    return StatusRecorder()


async def provider_for(smsc: SmscSimulator, **overrides: Any) -> SmppProvider:
    return SmppProvider(make_config(smsc, **overrides))


# -- the independent decoder ----------------------------------------------------------


def parsed(submit: RecordedSubmit) -> smpplib.command.SubmitSM:
    pdu = smpplib.smpp.parse_pdu(submit.frame, need_sequence=False)
    assert pdu.command == "submit_sm"
    return pdu


def gsm_decode(septets: bytes) -> str:
    """One septet per octet through smpplib's GSM 03.38 table (escapes at 0x80 + code)."""
    table = smpplib.gsm.GSM_CHARACTER_TABLE
    chars, escaped = [], False
    for septet in septets:
        if escaped:
            chars.append(table[0x80 + septet])
            escaped = False
        elif septet == 0x1B:
            escaped = True
        else:
            chars.append(table[septet])
    assert not escaped, "a part ends inside a GSM escape"
    return "".join(chars)


def decode(data_coding: int, data: bytes) -> str:
    if data_coding == smpplib.consts.SMPP_ENCODING_DEFAULT:
        return gsm_decode(data)
    if data_coding == smpplib.consts.SMPP_ENCODING_ISO10646:
        return data.decode("utf-16-be")  # strict: a split surrogate pair raises
    if data_coding == smpplib.consts.SMPP_ENCODING_IA5:
        return data.decode("ascii")
    assert data_coding == smpplib.consts.SMPP_ENCODING_ISO88591
    return data.decode("latin-1")


def concatenation(udh: bytes) -> tuple[int, int, int]:
    """(reference, total, number) from the concatenation element (IEI 0x00 or 0x08)."""
    at = 1
    while at < len(udh):
        iei, length = udh[at], udh[at + 1]
        value = udh[at + 2 : at + 2 + length]
        if iei == 0x00:
            return value[0], value[1], value[2]
        if iei == 0x08:
            return int.from_bytes(value[:2], "big"), value[2], value[3]
        at += 2 + length
    raise AssertionError(f"no concatenation element in UDH {udh.hex()}")


def reassembled(submits: list[RecordedSubmit], mode: str) -> tuple[str, int]:
    """The text the handset shows, and the number of parts, each part decoded alone."""
    pieces: dict[int, str] = {}
    references, totals = set(), set()
    for submit in submits:
        pdu = parsed(submit)
        short_message: bytes = pdu.short_message or b""
        if mode == "udh":
            assert pdu.esm_class & UDHI
            udh_length = short_message[0] + 1
            reference, total, number = concatenation(short_message[:udh_length])
            user_data = short_message[udh_length:]
        else:
            assert not pdu.esm_class & UDHI
            reference, total, number = (
                pdu.sar_msg_ref_num,
                pdu.sar_total_segments,
                pdu.sar_segment_seqnum,
            )
            user_data = short_message
        references.add(reference)
        totals.add(total)
        assert number not in pieces
        pieces[number] = decode(pdu.data_coding, user_data)
    assert len(references) == 1 and totals == {len(pieces)}
    assert sorted(pieces) == list(range(1, len(pieces) + 1))
    return "".join(pieces[n] for n in sorted(pieces)), len(pieces)


# -- splitting ------------------------------------------------------------------------


# smpplib's GSM table has '`' for '§' and lacks the form feed: left out.
@given(st.text(st.characters(exclude_categories=["Cs"], exclude_characters="§\f"), max_size=700))
def test_any_text_splits_into_parts_that_decode_alone_and_fit_one_sms(text: str) -> None:
    data_coding, parts = split_text(text)

    assert "".join(decode(data_coding, part) for part in parts) == text
    if len(parts) > 1:
        limit = 153 if data_coding == DataCoding.SMSC_DEFAULT else 134
        assert all(len(part) <= limit for part in parts)


def test_parts_are_cut_before_an_escape_or_a_surrogate_pair_that_would_not_fit() -> None:
    gsm_parts = split_text(LONG_GSM)[1]
    assert [len(part) for part in gsm_parts] == [152, 152, 32]
    assert gsm_parts[1].startswith(b"\x1b\x65")  # '€' opens part 2
    assert gsm_parts[2].startswith(b"\x1b\x28")  # '{' opens part 3
    ucs2_parts = split_text(LONG_UCS2)[1]
    assert len(ucs2_parts[0]) == 132  # 66 characters: '🙂' would make 136 octets
    assert ucs2_parts[1].startswith("🙂".encode("utf-16-be"))


# -- through the adapter, against the simulated SMSC ------------------------------------


@pytest.mark.parametrize("mode", ["udh", "sar"])
@pytest.mark.parametrize(
    ("text", "data_coding"),
    [(LONG_GSM, DataCoding.SMSC_DEFAULT), (LONG_UCS2, DataCoding.UCS2)],
    ids=["gsm7", "ucs2"],
)
async def test_a_long_text_is_split_and_an_independent_decoder_reassembles_it(
    smsc: SmscSimulator, mode: str, text: str, data_coding: DataCoding
) -> None:
    adapter = await provider_for(smsc, long_messages=mode)
    try:
        result = await adapter.send(sms(SimulatedNumber.NO_RECEIPT, text=text))
    finally:
        await adapter.aclose()

    submits = smsc.submits
    assert [s.status for s in submits] == [CommandStatus.ESME_ROK] * 3
    assert {parsed(s).data_coding for s in submits} == {data_coding}
    assert reassembled(submits, mode) == (text, 3)
    # One try, one reference; the attempt is the last part's id, with its SMS count.
    assert result == Accepted(provider_message_id=submits[-1].message_id or "", segments=3)


async def test_a_text_that_fits_one_sms_goes_as_one_without_udh_or_sar(
    smsc: SmscSimulator,
) -> None:
    adapter = await provider_for(smsc)
    try:
        result = await adapter.send(sms(SimulatedNumber.NO_RECEIPT, text="€" * 80))  # 160 septets
    finally:
        await adapter.aclose()

    [submit] = smsc.submits
    pdu = parsed(submit)
    assert (pdu.esm_class, pdu.sar_msg_ref_num) == (0, None)
    assert decode(pdu.data_coding, pdu.short_message) == "€" * 80
    assert isinstance(result, Accepted) and result.segments == 1


async def test_a_retry_of_a_long_message_uses_a_new_reference(smsc: SmscSimulator) -> None:
    adapter = await provider_for(smsc)
    try:
        first = sms(SimulatedNumber.NO_RECEIPT, text=LONG_GSM)
        await adapter.send(first)
        await adapter.send(replace(first, try_number=1))
    finally:
        await adapter.aclose()

    references = [concatenation(parsed(s).short_message[:6])[0] for s in smsc.submits]
    assert len(set(references[:3])) == 1 and len(set(references[3:])) == 1
    assert references[0] != references[3]


async def test_an_smsc_without_tlv_support_refuses_message_payload_but_takes_udh_parts(
    smsc: SmscSimulator,
) -> None:
    smsc.supports_tlvs = False
    payload = await provider_for(smsc, long_messages="message_payload")
    udh = await provider_for(smsc, long_messages="udh")
    try:
        refused = await payload.send(sms(SimulatedNumber.NO_RECEIPT, text=LONG_GSM))
        taken = await udh.send(sms(SimulatedNumber.NO_RECEIPT, text=LONG_GSM))
    finally:
        await payload.aclose()
        await udh.aclose()

    assert refused == Rejected(code="smpp:0x000000C1", detail="ESME_ROPTPARNOTALLWD")
    assert isinstance(taken, Accepted) and taken.segments == 3
    assert reassembled(smsc.submits[1:], "udh") == (LONG_GSM, 3)


@pytest.mark.parametrize(
    ("default_data_coding", "text", "data_coding"),
    [
        (1, "Hello {world} @home ~ok", DataCoding.IA5),
        (3, "Café ñ £5", DataCoding.LATIN1),
        (1, "Café", DataCoding.UCS2),  # é is no IA5 character
        (0, "Café @ £5", DataCoding.SMSC_DEFAULT),
    ],
)
async def test_the_default_alphabets_data_coding_is_the_accounts(
    smsc: SmscSimulator, default_data_coding: int, text: str, data_coding: DataCoding
) -> None:
    adapter = await provider_for(smsc, default_data_coding=default_data_coding)
    try:
        assert isinstance(await adapter.send(sms(SimulatedNumber.NO_RECEIPT, text=text)), Accepted)
    finally:
        await adapter.aclose()

    [submit] = smsc.submits
    pdu = parsed(submit)
    assert pdu.data_coding == data_coding
    assert decode(pdu.data_coding, pdu.short_message) == text


async def test_a_long_ia5_text_is_split_by_septets(smsc: SmscSimulator) -> None:
    text = "a" * 152 + "{" + "b" * 160
    adapter = await provider_for(smsc, default_data_coding=1)
    try:
        result = await adapter.send(sms(SimulatedNumber.NO_RECEIPT, text=text))
    finally:
        await adapter.aclose()

    assert isinstance(result, Accepted) and result.segments == 3
    assert reassembled(smsc.submits, "udh") == (text, 3)


# -- receipts of the parts ------------------------------------------------------------


async def test_the_last_parts_receipt_delivers_the_attempt(
    smsc: SmscSimulator, statuses: StatusRecorder
) -> None:
    adapter = SmppProvider(make_config(smsc), on_status=statuses)
    try:
        result = await adapter.send(sms(SimulatedNumber.DELIVERED, text=LONG_GSM, attempt_id="a"))
        await smsc.wait_until(
            lambda: (
                len(smsc.receipts) == 3
                and all(r.response_status is not None for r in smsc.receipts)
            )
        )
        [update] = await statuses.wait_for(1)
    finally:
        await adapter.aclose()

    assert isinstance(result, Accepted)
    assert all(r.response_status == CommandStatus.ESME_ROK for r in smsc.receipts)
    assert update.status is ReceiptStatus.DELIVERED
    assert (update.attempt_id, update.provider_message_id) == ("a", result.provider_message_id)
    assert update.provider_message_id == smsc.submits[-1].message_id


async def test_a_failed_parts_receipt_fails_the_attempt(
    smsc: SmscSimulator, statuses: StatusRecorder
) -> None:
    adapter = SmppProvider(make_config(smsc), on_status=statuses)
    try:
        result = await adapter.send(
            sms(SimulatedNumber.FIRST_PART_UNDELIVERED, text=LONG_UCS2, attempt_id="b")
        )
        updates = await statuses.wait_for(2)
    finally:
        await adapter.aclose()

    assert isinstance(result, Accepted)
    # Receipts of different parts come in any order (so do an SMSC's).
    [failed] = [u for u in updates if u.status is ReceiptStatus.FAILED]
    [delivered] = [u for u in updates if u.status is ReceiptStatus.DELIVERED]
    first_part = smsc.submits[0].message_id
    assert (failed.status, failed.error_code) == (ReceiptStatus.FAILED, "smpp:UNDELIV:001")
    assert (failed.attempt_id, failed.provider_message_id) == ("b", result.provider_message_id)
    assert failed.event_id == f"{first_part}:UNDELIV"  # its own report, deduplicated alone
    assert delivered.event_id == f"{result.provider_message_id}:DELIVRD"


async def test_a_part_refused_after_others_were_taken_withdraws_them(
    smsc: SmscSimulator,
) -> None:
    adapter = await provider_for(smsc)
    try:
        with pytest.raises(TransientProviderError) as raised:
            await adapter.send(sms(SimulatedNumber.SECOND_PART_THROTTLED, text=LONG_GSM))
    finally:
        await adapter.aclose()

    assert raised.value.code == "smpp:0x00000058"
    assert [s.status for s in smsc.submits] == [CommandStatus.ESME_ROK, 0x58]  # no part 3
    [cancel] = smsc.cancels
    assert cancel.pdu.message_id == smsc.submits[0].message_id
    assert cancel.status == CommandStatus.ESME_ROK and smsc.submits[0].cancelled


# -- cancel_sm ------------------------------------------------------------------------


def cancel_sm_fields(frame: bytes) -> tuple[int, list[str | int]]:
    """cancel_sm by §4.9.1, read here: (command_id, the fields in order)."""
    length, command_id, _, _ = struct.unpack(">IIII", frame[:16])
    assert length == len(frame)
    body, fields = frame[16:], list[str | int]()
    at = 0
    for kind in ("s", "s", "i", "i", "s", "i", "i", "s"):
        if kind == "i":
            fields.append(body[at])
            at += 1
        else:
            end = body.index(0, at)
            fields.append(body[at:end].decode("ascii"))
            at = end + 1
    assert at == len(body)
    return command_id, fields


async def test_cancel_withdraws_every_part_with_the_addresses_they_were_sent_with(
    smsc: SmscSimulator,
) -> None:
    adapter = await provider_for(smsc, service_type="OTP")
    try:
        result = await adapter.send(sms(SimulatedNumber.NO_RECEIPT, text=LONG_GSM))
        assert isinstance(result, Accepted)
        assert await adapter.cancel(result.provider_message_id) is True
        assert await adapter.cancel(result.provider_message_id) is False  # already withdrawn
    finally:
        await adapter.aclose()

    part_ids = [s.message_id for s in smsc.submits]
    first_three = smsc.cancels[:3]
    assert [c.pdu.message_id for c in first_three] == part_ids
    assert all(c.status == CommandStatus.ESME_ROK for c in first_three)
    assert all(s.cancelled for s in smsc.submits)
    command_id, fields = cancel_sm_fields(first_three[0].frame)
    assert command_id == 0x00000008
    assert fields == ["OTP", part_ids[0], 1, 1, "15557654321", 1, 1, "15550100003"]
    assert [c.status for c in smsc.cancels[3:]] == [CommandStatus.ESME_RCANCELFAIL] * 3


async def test_a_delivered_message_can_no_longer_be_cancelled(
    smsc: SmscSimulator, statuses: StatusRecorder
) -> None:
    adapter = SmppProvider(make_config(smsc), on_status=statuses)
    try:
        result = await adapter.send(sms(SimulatedNumber.DELIVERED))
        await statuses.wait_for(1)
        assert isinstance(result, Accepted)
        assert await adapter.cancel(result.provider_message_id) is False
    finally:
        await adapter.aclose()
    [cancel] = smsc.cancels
    assert cancel.status == CommandStatus.ESME_RCANCELFAIL


async def test_another_process_cancels_by_id_from_the_default_sender(smsc: SmscSimulator) -> None:
    config: dict[str, Any] = {"hex_message_ids": "submit_sm_resp"}
    sender = await provider_for(smsc, **config)
    try:
        result = await sender.send(sms(SimulatedNumber.NO_RECEIPT))
    finally:
        await sender.aclose()
    assert isinstance(result, Accepted)

    other = await provider_for(smsc, **config)  # never saw the submit
    try:
        assert await other.cancel(result.provider_message_id) is True
    finally:
        await other.aclose()
    [cancel] = smsc.cancels
    assert cancel.pdu.message_id == smsc.submits[0].message_id  # back in the SMSC's hex
    assert (cancel.pdu.source_addr, cancel.pdu.destination_addr) == ("15557654321", "")
