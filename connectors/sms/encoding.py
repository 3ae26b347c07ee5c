"""SMS encoding and segment count (3GPP TS 23.038).

A text that fits the GSM 7-bit default alphabet (extension-table characters
count twice, as they are sent with an escape) is sent as GSM-7: 160 septets in
one SMS, 153 per segment when concatenated. Anything else is sent as UCS-2:
70 UTF-16 code units in one SMS, 67 per segment (emoji outside the BMP take
two units).
"""

from __future__ import annotations

from dataclasses import dataclass

GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞ\x1bÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENSION = frozenset("^{}\\[~]|€\f")
GSM7_ALL = GSM7_BASIC | GSM7_EXTENSION


@dataclass(frozen=True, slots=True)
class SmsEncoding:
    """How a text goes over the air."""

    #: "GSM-7" or "UCS-2".
    encoding: str
    #: Septets (GSM-7) or UTF-16 code units (UCS-2).
    units: int
    segments: int


def analyze(text: str) -> SmsEncoding:
    """Encoding, length in units, and number of segments of ``text``."""
    # Set operations rather than a loop per character: this runs for every
    # inbound and outbound text.
    chars = set(text)
    if chars <= GSM7_ALL:
        extended = chars & GSM7_EXTENSION
        units = len(text) + (sum(text.count(c) for c in extended) if extended else 0)
        single, multi, encoding = 160, 153, "GSM-7"
    else:
        units = len(text.encode("utf-16-le")) // 2
        single, multi, encoding = 70, 67, "UCS-2"
    segments = 1 if units <= single else -(-units // multi)
    return SmsEncoding(encoding=encoding, units=units, segments=max(segments, 1))


def attributes(text: str) -> dict[str, str]:
    """Event attributes describing the encoding of ``text``."""
    info = analyze(text)
    return {
        "sms.encoding": info.encoding,
        "sms.segments": str(info.segments),
        "sms.units": str(info.units),
    }
