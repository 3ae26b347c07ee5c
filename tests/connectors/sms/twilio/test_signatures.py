"""``X-Twilio-Signature`` verification, checked against Twilio's own SDK.

Every case is decided twice: by ``twilio.request_validator.RequestValidator``
(the provider's validator, the oracle) and by our verifier; they must agree.
Then the same requests go over real HTTP to the running service: a refusal is
a 401/403 (never a 500) and publishes nothing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest
from multidict import MultiDict
from twilio.request_validator import RequestValidator  # type: ignore[import-untyped]

from connectors.sms.twilio.webhooks import verify
from gateway.contract import AuthError, WebhookRequest
from gateway.runtime.memory_bus import InMemoryBus
from gateway.testing.conformance import Harness, WebhookCall, serve
from gateway.testing.fake_twilio import FakeTwilio
from tests.connectors.sms.twilio import support as tw

# The example of Twilio's security docs (https://www.twilio.com/docs/usage/security).
DOCS_URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
DOCS_TOKEN = "12345"
DOCS_PARAMS = {
    "CallSid": "CA1234567890ABCDE",
    "Caller": "+12349013030",
    "Digits": "1234",
    "From": "+12349013030",
    "To": "+18005551212",
}
DOCS_SIGNATURE = "0/KCTR6DLpKmkAf8muzZqo1nDgQ="


def ours(
    url: str,
    body: bytes,
    signature: str | None,
    token: str,
    *,
    content_type: str = tw.FORM,
    method: str = "POST",
    extra_headers: dict[str, str] | None = None,
) -> bool:
    """Our verifier's verdict (an AuthError is False; anything else propagates)."""
    headers = {"Content-Type": content_type, **(extra_headers or {})}
    if signature is not None:
        headers[tw.SIGNATURE_HEADER] = signature
    request = WebhookRequest(
        method=method,
        url=url,
        path_params={},
        headers=headers,
        query=MultiDict(parse_qsl(urlsplit(url).query, keep_blank_values=True)),
        body=body,
    )
    try:
        verify(request, token)
    except AuthError:
        return False
    return True


def theirs(url: str, params: object, signature: str, token: str) -> bool:
    """Twilio's SDK verdict."""
    return bool(RequestValidator(token).validate(url, params, signature))


def test_docs_vector_is_reproduced_by_the_sdk_and_accepted_by_us() -> None:
    sdk = RequestValidator(DOCS_TOKEN).compute_signature(DOCS_URL, DOCS_PARAMS)
    assert sdk == DOCS_SIGNATURE
    body = urlencode(DOCS_PARAMS).encode()
    assert ours(DOCS_URL, body, DOCS_SIGNATURE, DOCS_TOKEN)
    assert theirs(DOCS_URL, DOCS_PARAMS, DOCS_SIGNATURE, DOCS_TOKEN)


@dataclass(frozen=True)
class FormCase:
    """A request as signed and as received; ``valid`` is the expected verdict."""

    name: str
    signed_url: str
    signed: list[tuple[str, str]]
    sent_url: str
    sent: list[tuple[str, str]]
    valid: bool
    signing_token: str = DOCS_TOKEN


_P = list(DOCS_PARAMS.items())
_HOOK = "https://hooks.example.com/webhooks/sms/twilio/main/inbound"
_HTTP_HOOK = "http://hooks.example.com/webhooks/sms/twilio/main/inbound"
_PORTED = "https://hooks.example.com:8443/webhooks/sms/twilio/main/inbound"
FORM_CASES = [
    FormCase(name="valid", signed_url=DOCS_URL, signed=_P, sent_url=DOCS_URL, sent=_P, valid=True),
    FormCase(
        name="tampered value",
        signed_url=DOCS_URL,
        signed=_P,
        sent_url=DOCS_URL,
        sent=[(k, "9999" if k == "Digits" else v) for k, v in _P],
        valid=False,
    ),
    FormCase(
        name="added parameter",
        signed_url=DOCS_URL,
        signed=_P,
        sent_url=DOCS_URL,
        sent=[*_P, ("Extra", "x")],
        valid=False,
    ),
    FormCase(
        name="removed parameter",
        signed_url=DOCS_URL,
        signed=_P,
        sent_url=DOCS_URL,
        sent=_P[1:],
        valid=False,
    ),
    FormCase(
        name="renamed parameter",
        signed_url=DOCS_URL,
        signed=_P,
        sent_url=DOCS_URL,
        sent=[("Digitz" if k == "Digits" else k, v) for k, v in _P],
        valid=False,
    ),
    FormCase(
        name="wrong token",
        signed_url=DOCS_URL,
        signed=_P,
        sent_url=DOCS_URL,
        sent=_P,
        valid=False,
        signing_token="54321",
    ),
    FormCase(
        name="query string changed",
        signed_url=DOCS_URL,
        signed=_P,
        sent_url=DOCS_URL.replace("bar=2", "bar=3"),
        sent=_P,
        valid=False,
    ),
    FormCase(
        name="another path",
        signed_url=_HOOK,
        signed=_P,
        sent_url=_HOOK.replace("/main/", "/other/"),
        sent=_P,
        valid=False,
    ),
    FormCase(
        name="https: signed without port, called with :443",
        signed_url=_HOOK,
        signed=_P,
        sent_url=_HOOK.replace(".com/", ".com:443/"),
        sent=_P,
        valid=True,
    ),
    FormCase(
        name="https: signed with :443, called without port",
        signed_url=_HOOK.replace(".com/", ".com:443/"),
        signed=_P,
        sent_url=_HOOK,
        sent=_P,
        valid=True,
    ),
    FormCase(
        name="http: signed with :80, called without port",
        signed_url=_HTTP_HOOK.replace(".com/", ".com:80/"),
        signed=_P,
        sent_url=_HTTP_HOOK,
        sent=_P,
        valid=True,
    ),
    FormCase(
        name="non-default port, signed with it",
        signed_url=_PORTED,
        signed=_P,
        sent_url=_PORTED,
        sent=_P,
        valid=True,
    ),
    FormCase(
        # Twilio has signed such URLs without the port (twilio-python #402/#477).
        name="non-default port, signed without it",
        signed_url=_HOOK,
        signed=_P,
        sent_url=_PORTED,
        sent=_P,
        valid=True,
    ),
    FormCase(
        name="non-default port, signed with another port",
        signed_url=_PORTED.replace("8443", "9443"),
        signed=_P,
        sent_url=_PORTED,
        sent=_P,
        valid=False,
    ),
    FormCase(
        name="http and https differ",
        signed_url=_HTTP_HOOK,
        signed=_P,
        sent_url=_HOOK,
        sent=_P,
        valid=False,
    ),
    FormCase(
        name="repeated parameter, every value signed",
        signed_url=_HOOK,
        signed=[*_P, ("MediaUrl", "https://x.example/2"), ("MediaUrl", "https://x.example/1")],
        sent_url=_HOOK,
        sent=[*_P, ("MediaUrl", "https://x.example/1"), ("MediaUrl", "https://x.example/2")],
        valid=True,
    ),
    FormCase(
        name="repeated parameter, one value dropped",
        signed_url=_HOOK,
        signed=[*_P, ("MediaUrl", "https://x.example/1"), ("MediaUrl", "https://x.example/2")],
        sent_url=_HOOK,
        sent=[*_P, ("MediaUrl", "https://x.example/1")],
        valid=False,
    ),
    FormCase(
        name="unicode values",
        signed_url=_HOOK,
        signed=[*_P, ("Body", "Grüße 👋 — ok?")],
        sent_url=_HOOK,
        sent=[*_P, ("Body", "Grüße 👋 — ok?")],
        valid=True,
    ),
    FormCase(
        name="unicode value altered (NFC vs NFD)",
        signed_url=_HOOK,
        signed=[*_P, ("Body", "Grüße")],
        sent_url=_HOOK,
        sent=[*_P, ("Body", "Gru\u0308ße")],
        valid=False,
    ),
]


@pytest.mark.parametrize("case", FORM_CASES, ids=lambda c: c.name)
def test_form_signature_agrees_with_twilio_sdk(case: FormCase) -> None:
    signature = RequestValidator(case.signing_token).compute_signature(
        case.signed_url, MultiDict(case.signed)
    )
    sdk = theirs(case.sent_url, MultiDict(case.sent), signature, DOCS_TOKEN)
    mine = ours(case.sent_url, urlencode(case.sent).encode(), signature, DOCS_TOKEN)
    assert sdk == case.valid, "the oracle disagrees with the case's expectation"
    assert mine == sdk


def _json_request(body: bytes, *, url: str = _HOOK) -> tuple[str, str]:
    signed_url = f"{url}?bodySHA256={hashlib.sha256(body).hexdigest()}"
    return signed_url, RequestValidator(DOCS_TOKEN).compute_signature(signed_url, None)


JSON_BODY = json.dumps({"MessageSid": "SM" + "0" * 32, "Body": "héllo"}).encode()


@pytest.mark.parametrize(
    ("name", "body_sent", "url_change"),
    [
        ("valid", JSON_BODY, None),
        ("tampered body", JSON_BODY.replace(b"llo", b"LLO"), None),
        ("re-serialised body", json.dumps(json.loads(JSON_BODY), indent=1).encode(), None),
        ("bodySHA256 swapped for the tampered body", b'{"Body": "x"}', "rehash"),
    ],
)
def test_json_body_signature_agrees_with_twilio_sdk(
    name: str, body_sent: bytes, url_change: str | None
) -> None:
    url, signature = _json_request(JSON_BODY)
    if url_change == "rehash":  # the attacker fixes the hash, but it is signed
        url = f"{_HOOK}?bodySHA256={hashlib.sha256(body_sent).hexdigest()}"
    sdk = theirs(url, body_sent.decode(), signature, DOCS_TOKEN)
    mine = ours(url, body_sent, signature, DOCS_TOKEN, content_type="application/json")
    assert sdk == (name == "valid")
    assert mine == sdk


@pytest.mark.parametrize(
    "header",
    ["", " ", "not base64 at all", "%%%%", "Zm9yZ2Vk", "ü" * 28, "A" * 10_000, DOCS_SIGNATURE[:-1]],
)
def test_malformed_signature_headers_are_refused_not_raised(header: str) -> None:
    body = urlencode(DOCS_PARAMS).encode()
    assert not ours(DOCS_URL, body, header, DOCS_TOKEN)
    assert not theirs(DOCS_URL, DOCS_PARAMS, header, DOCS_TOKEN)


def test_missing_signature_header_is_refused() -> None:
    assert not ours(DOCS_URL, urlencode(DOCS_PARAMS).encode(), None, DOCS_TOKEN)


def test_sha256_shared_key_signature_agrees_with_twilio_sdk() -> None:
    signature = RequestValidator(DOCS_TOKEN).compute_signature(
        DOCS_URL, DOCS_PARAMS, algorithm="HMAC_SHA256"
    )
    settings = {
        "X-Twilio-Webhooks-Signature-Settings": "key=webhooks_sharedkey_1,algorithm=HMAC_SHA256"
    }
    body = urlencode(DOCS_PARAMS).encode()
    assert theirs(DOCS_URL, DOCS_PARAMS, signature, DOCS_TOKEN) is False  # SHA1 by default
    assert RequestValidator(DOCS_TOKEN).validate(DOCS_URL, DOCS_PARAMS, signature, "HMAC_SHA256")
    assert ours(DOCS_URL, body, signature, DOCS_TOKEN, extra_headers=settings)
    assert not ours(DOCS_URL, body, signature, DOCS_TOKEN)


def test_get_webhook_signs_the_url_alone() -> None:
    url = f"{_HOOK}?{urlencode(DOCS_PARAMS)}"
    signature = RequestValidator(DOCS_TOKEN).compute_signature(url, {})
    assert theirs(url, {}, signature, DOCS_TOKEN)
    assert ours(url, b"", signature, DOCS_TOKEN, method="GET")
    assert not ours(
        url.replace("Digits=1234", "Digits=9"), b"", signature, DOCS_TOKEN, method="GET"
    )


# -- over real HTTP, through the service -----------------------------------------------

TOKEN = tw.new_token()
OTHER_TOKEN = tw.new_token()
ENV = {tw.TOKEN_ENV: TOKEN, tw.OTHER_TOKEN_ENV: OTHER_TOKEN}
PUBLIC = "https://hooks.example.com/sms"


@pytest.fixture
async def two_accounts() -> AsyncIterator[Harness]:
    """The Twilio connector with two accounts, behind a proxy at ``PUBLIC``."""
    async with serve(
        "sms.twilio",
        FakeTwilio(auth_token=TOKEN, callback_statuses=()),
        lambda api: tw.settings(api, two_accounts=True),
        environ=ENV,
        http={"public_base_url": PUBLIC},
    ) as harness:
        yield harness


def _local(h: Harness, public_url: str) -> str:
    """Where the proxy forwards ``public_url``: the service socket, prefix stripped."""
    path = public_url.removeprefix(PUBLIC)
    return f"http://127.0.0.1:{h.service.port}{path}"


async def _post_signed(
    h: Harness,
    public_url: str,
    params: dict[str, str],
    *,
    token: str | None,
    signature: str | None = None,
) -> int:
    call = tw.form_call(public_url, params, token=token, signature=signature)
    status, _ = await h.post(
        WebhookCall(url=_local(h, public_url), headers=call.headers, body=call.body)
    )
    return status


async def test_webhook_behind_a_proxy_is_checked_against_the_public_url(
    two_accounts: Harness,
) -> None:
    h = two_accounts
    url = f"{PUBLIC}/webhooks/sms/twilio/main/inbound"
    params = tw.inbound_params(tw.message_sid())
    # Signed for the URL the service sees (no proxy awareness): refused.
    local_call = tw.form_call(_local(h, url), params, token=TOKEN)
    status, _ = await h.post(local_call)
    assert status == 401
    # Signed for the public URL Twilio called: accepted.
    assert await _post_signed(h, url, params, token=TOKEN) == 200
    (event,) = await h.wait_for(lambda e: True, 1)
    assert event.account == "main"


async def test_each_account_is_checked_with_its_own_token(two_accounts: Harness) -> None:
    h = two_accounts
    main = f"{PUBLIC}/webhooks/sms/twilio/main/inbound"
    other = f"{PUBLIC}/webhooks/sms/twilio/other/inbound"
    main_params = tw.inbound_params(tw.message_sid())
    other_params = {
        **tw.inbound_params(tw.message_sid()),
        "AccountSid": tw.OTHER_ACCOUNT_SID,
        "To": tw.OTHER_NUMBER,
    }
    assert await _post_signed(h, other, other_params, token=TOKEN) == 401
    assert await _post_signed(h, main, main_params, token=OTHER_TOKEN) == 401
    # The other account's payload replayed to the main account's URL, re-signed
    # with main's token (a leaked token of one account): AccountSid betrays it.
    assert await _post_signed(h, main, other_params, token=TOKEN) == 403
    assert h.events == []
    assert await _post_signed(h, other, other_params, token=OTHER_TOKEN) == 200
    assert await _post_signed(h, main, main_params, token=TOKEN) == 200
    events = await h.wait_for(lambda e: True, 2)
    assert sorted(e.account for e in events) == ["main", "other"]
    by_account = {e.account: e for e in events}
    assert by_account["other"].message.provider_message_id == other_params["MessageSid"]
    assert by_account["other"].message.recipients[0].address == tw.OTHER_NUMBER


@dataclass(frozen=True)
class Forgery:
    """How a forged request differs from a valid one."""

    account: str = "main"
    #: Token that signs it (None: no signature header at all).
    token: str | None = TOKEN
    #: A literal signature header instead of a computed one; "truncated" cuts the valid one.
    signature: str | None = None
    #: Parameters changed after signing (the valid signature is kept).
    params_change: dict[str, str] | None = None


FORGERIES = {
    "tampered body": Forgery(params_change={"Body": "Pay here"}),
    "added parameter": Forgery(params_change={"Extra": "1"}),
    "wrong token": Forgery(token=OTHER_TOKEN),
    "missing header": Forgery(token=None),
    "empty header": Forgery(signature=""),
    "non-base64 header": Forgery(signature="!!!not base64!!!"),
    "non-ASCII header": Forgery(signature="sïgnätürè"),
    "truncated signature": Forgery(signature="truncated"),
    "unknown account": Forgery(account="ghost"),
}


@pytest.mark.parametrize("name", list(FORGERIES))
async def test_forged_webhooks_are_401_or_403_never_500_and_publish_nothing(
    two_accounts: Harness, name: str
) -> None:
    h = two_accounts
    forgery = FORGERIES[name]
    url = f"{PUBLIC}/webhooks/sms/twilio/{forgery.account}/inbound"
    params = tw.inbound_params(tw.message_sid())
    good = tw.sign(TOKEN, url, list(params.items()))
    signature = forgery.signature
    if signature == "truncated":
        signature = good[:-2]
    changed = {**params, **(forgery.params_change or {})}
    if forgery.params_change:
        signature = good
    headers = dict(tw.form_call(url, changed, token=forgery.token, signature=signature).headers)
    if signature is not None and not signature.isascii():
        # aiohttp refuses non-latin-1 header values client-side; send the UTF-8 bytes.
        headers[tw.SIGNATURE_HEADER] = signature.encode().decode("latin-1")
    status, body = await h.post(
        WebhookCall(url=_local(h, url), headers=headers, body=urlencode(changed).encode())
    )
    assert status in (401, 403), (status, body)
    bus = h.bus
    assert isinstance(bus, InMemoryBus)
    assert bus.published == []


async def test_json_webhook_over_http(two_accounts: Harness) -> None:
    h = two_accounts
    url = f"{PUBLIC}/webhooks/sms/twilio/main/inbound"
    payload = json.dumps(tw.inbound_params(tw.message_sid(), body="JSON 👍")).encode()
    good = tw.json_call(url, payload, token=TOKEN)
    tampered = WebhookCall(
        url=_local(h, good.url), headers=good.headers, body=payload.replace(b"JSON", b"XSON")
    )
    status, _ = await h.post(tampered)
    assert status == 401
    status, _ = await h.post(
        WebhookCall(url=_local(h, good.url), headers=good.headers, body=payload)
    )
    assert status == 200
    (event,) = await h.wait_for(lambda e: True, 1)
    assert event.message.text.body == "JSON 👍"
    assert event.raw.content_type == "application/json"
    assert event.raw.data == payload


async def test_malformed_form_body_is_a_4xx_not_a_500(two_accounts: Harness) -> None:
    h = two_accounts
    url = f"{PUBLIC}/webhooks/sms/twilio/main/inbound"
    body = b"\xff\xfe=%%%&&=="
    status, _ = await h.post(
        WebhookCall(
            url=_local(h, url),
            headers={"Content-Type": tw.FORM, tw.SIGNATURE_HEADER: "Zm9yZ2Vk"},
            body=body,
        )
    )
    assert 400 <= status < 500
    assert h.events == []


@pytest.mark.parametrize(
    ("public_base", "signed_base", "expected"),
    [
        ("https://hooks.example.com", "https://hooks.example.com:443", 200),
        ("https://hooks.example.com:443", "https://hooks.example.com", 200),
        ("https://hooks.example.com:8443", "https://hooks.example.com:8443", 200),
        ("https://hooks.example.com:8443", "https://hooks.example.com", 200),
        ("https://hooks.example.com:8443", "https://hooks.example.com:9443", 401),
        ("https://hooks.example.com", "http://hooks.example.com", 401),
    ],
)
async def test_port_variants_over_http(public_base: str, signed_base: str, expected: int) -> None:
    async with serve(
        "sms.twilio",
        FakeTwilio(auth_token=TOKEN, callback_statuses=()),
        tw.settings,
        environ=ENV,
        http={"public_base_url": public_base},
    ) as h:
        path = "/webhooks/sms/twilio/main/inbound"
        params = tw.inbound_params(tw.message_sid())
        call = tw.form_call(signed_base + path, params, token=TOKEN)
        local = f"http://127.0.0.1:{h.service.port}{path}"
        status, _ = await h.post(WebhookCall(url=local, headers=call.headers, body=call.body))
        assert status == expected
        assert isinstance(h.bus, InMemoryBus)
        assert len(h.bus.published) == (1 if expected == 200 else 0)
