"""SMS encoding and segment counts (3GPP TS 23.038 / 23.040)."""

from __future__ import annotations

import pytest

from connectors.sms.encoding import GSM7_BASIC, GSM7_EXTENSION, analyze, attributes

# The GSM 7-bit default alphabet and its extension table, written out from the spec.
SPEC_BASIC = (
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞ\x1bÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
SPEC_EXTENSION = "\f^{}\\[~]|€"


def test_alphabet_tables_match_the_spec() -> None:
    assert len(SPEC_BASIC) == 128
    assert frozenset(SPEC_BASIC) == GSM7_BASIC
    assert frozenset(SPEC_EXTENSION) == GSM7_EXTENSION


@pytest.mark.parametrize(
    ("text", "encoding", "units", "segments"),
    [
        ("", "GSM-7", 0, 1),
        ("Hello world", "GSM-7", 11, 1),
        ("@£$¥èéùìò", "GSM-7", 9, 1),
        ("ÄÖÑÜ§¿äöñüà", "GSM-7", 11, 1),
        # Extension characters are sent with an escape: two septets each.
        ("€", "GSM-7", 2, 1),
        ("[x]", "GSM-7", 5, 1),
        ("{}|~^\\", "GSM-7", 12, 1),
        # One character outside GSM-7 switches the whole text to UCS-2.
        ("Hello ç", "UCS-2", 7, 1),  # lower-case ç is not in the table (only Ç)
        ("Cześć", "UCS-2", 5, 1),
        ("Привет", "UCS-2", 6, 1),
        ("你好", "UCS-2", 2, 1),
        # Emoji outside the BMP are surrogate pairs: two UTF-16 units each.
        ("👍", "UCS-2", 2, 1),
        ("ok 👍🏽", "UCS-2", 7, 1),  # thumbs up + skin tone modifier: 2 + 2 units
        ("👨‍👩‍👧", "UCS-2", 8, 1),  # ZWJ family: 3 pairs + 2 joiners
    ],
)
def test_encoding_and_units(text: str, encoding: str, units: int, segments: int) -> None:
    info = analyze(text)
    assert (info.encoding, info.units, info.segments) == (encoding, units, segments)


@pytest.mark.parametrize(
    ("units", "segments"),
    [(1, 1), (160, 1), (161, 2), (306, 2), (307, 3), (459, 3), (460, 4), (1530, 10), (1531, 11)],
)
def test_gsm7_segment_boundaries(units: int, segments: int) -> None:
    assert analyze("a" * units).segments == segments


@pytest.mark.parametrize(
    ("units", "segments"),
    [(1, 1), (70, 1), (71, 2), (134, 2), (135, 3), (201, 3), (202, 4)],
)
def test_ucs2_segment_boundaries(units: int, segments: int) -> None:
    assert analyze("ж" * units).segments == segments


def test_extension_characters_count_twice_at_the_boundary() -> None:
    assert analyze("a" * 158 + "€").units == 160
    assert analyze("a" * 158 + "€").segments == 1
    assert analyze("a" * 159 + "€").segments == 2


def test_surrogate_pairs_count_twice_at_the_boundary() -> None:
    assert analyze("ж" * 68 + "😀").units == 70
    assert analyze("ж" * 68 + "😀").segments == 1
    assert analyze("ж" * 69 + "😀").segments == 2
    assert analyze("😀" * 35).segments == 1
    assert analyze("😀" * 36).segments == 2


def test_attributes() -> None:
    assert attributes("a" * 161) == {
        "sms.encoding": "GSM-7",
        "sms.segments": "2",
        "sms.units": "161",
    }
    assert attributes("😀") == {"sms.encoding": "UCS-2", "sms.segments": "1", "sms.units": "2"}
