"""The webhook form parser agrees with the stdlib's ``parse_qsl``.

``parse_form`` is a faster ``parse_qsl(keep_blank_values=True,
strict_parsing=True)``; these tests hold it to exactly the stdlib's answer,
errors included, over documented bodies and many generated ones.
"""

from __future__ import annotations

import random
from urllib.parse import parse_qsl, urlencode

import pytest

from gateway.contract.connector import WebhookRequest, parse_form
from gateway.contract.errors import BadRequestError

# Characters that exercise every branch: separators, escapes (valid, broken,
# non-UTF-8), plus signs, non-ASCII text.
ALPHABET = [
    *("a", "Z", "0", "=", "&", "+", "%", "%2B", "%20", "%e2%82%ac", "%ff", "%zz", "é", " "),
    # Escaped separators (the field-by-field path), and pieces of UTF-8
    # sequences that a separator cuts short.
    *("%26", "%3D", "%3d", "%C3", "%e2", "%82", "%AC", "%A9", "%"),
]


def _stdlib(text: str) -> list[tuple[str, str]] | type[ValueError]:
    try:
        return parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text))
    except ValueError:
        return ValueError


def _ours(text: str) -> list[tuple[str, str]] | type[ValueError]:
    try:
        return parse_form(text)
    except ValueError:
        return ValueError


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Body=Hello+world&From=%2B14155550123&To=%2B14155550100&NumMedia=0",
        "Body=&ToCity=&MessageSid=SM123",
        "MediaUrl0=https%3A%2F%2Fapi.twilio.com%2Fm%3Fa%3D1%26b%3D2&MediaUrl1=x",
        "Body=%F0%9F%98%80+caf%C3%A9",  # emoji and accents
        "a=1&a=2&a=3",  # repeated names keep every value, in order
        "a==b",  # only the first = splits
        "noequals",
        "a=1&&b=2",
        "a=1&",
        "%ff=%fe",  # not UTF-8 after decoding: replaced, like the stdlib
        "a=%C3&b=%A9",  # a UTF-8 sequence cut by a separator: two replacements
        "a=%E2%82&b=%AC%26",  # ... and an escaped separator elsewhere in the body
        "To=%2B14155550100&Body=x%3Dy",
    ],
)
def test_documented_and_edge_bodies_match_parse_qsl(text: str) -> None:
    assert _ours(text) == _stdlib(text)


def test_generated_bodies_match_parse_qsl() -> None:
    rng = random.Random(20261123)
    for _ in range(5000):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 24)))
        assert _ours(text) == _stdlib(text), text


def test_round_trip_of_encoded_fields() -> None:
    rng = random.Random(7)
    for _ in range(500):
        fields = [
            ("".join(rng.choice("aé+&=% 1") for _ in range(rng.randint(1, 6))), str(i))
            for i in range(rng.randint(1, 5))
        ]
        assert parse_form(urlencode(fields)) == fields


def test_malformed_form_is_a_bad_request() -> None:
    request = WebhookRequest(
        method="POST", url="http://x/", path_params={}, headers={}, query={}, body=b"a=1&broken"
    )
    with pytest.raises(BadRequestError, match="malformed form body"):
        _ = request.form
    not_utf8 = WebhookRequest(
        method="POST", url="http://x/", path_params={}, headers={}, query={}, body=b"a=\xff"
    )
    with pytest.raises(BadRequestError, match="malformed form body"):
        _ = not_utf8.form
