"""How many SMS segments a text needs: GSM-7 when every character fits, else UCS-2.

GSM 03.38: 160 septets in one message, 153 per part of a concatenated one (the rest is
the UDH); characters of the extension table cost two septets and an escape pair is never
split across parts. UCS-2: 70 UTF-16 units alone, 67 per part, surrogate pairs kept whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENSION = frozenset("^{}\\[~]|€\f")

Encoding = Literal["gsm7", "ucs2"]


@dataclass(frozen=True, slots=True)
class SmsSegments:
    encoding: Encoding
    units: int  # septets (GSM-7) or UTF-16 code units (UCS-2)
    segments: int


def _costs(text: str) -> tuple[Encoding, list[int]]:
    if all(c in GSM7_BASIC or c in GSM7_EXTENSION for c in text):
        return "gsm7", [2 if c in GSM7_EXTENSION else 1 for c in text]
    return "ucs2", [2 if ord(c) > 0xFFFF else 1 for c in text]


def sms_segments(text: str) -> SmsSegments:
    encoding, costs = _costs(text)
    single, part = (160, 153) if encoding == "gsm7" else (70, 67)
    units = sum(costs)
    if units <= single:
        return SmsSegments(encoding, units, 1 if units else 0)
    segments, used = 1, 0
    for cost in costs:
        if used + cost > part:
            segments, used = segments + 1, 0
        used += cost
    return SmsSegments(encoding, units, segments)
