"""Outbound SMTP submission (aiosmtplib): STARTTLS or implicit TLS, AUTH.

Errors carry the retry decision. Whether a failure may have delivered the
mail is what matters: a refused connection, a failed handshake or login, and
any definite SMTP reply (4xx: transient, 5xx: permanent) mean the message was
not accepted; a disconnect or timeout once the message is on its way is
ambiguous (the server may have queued it), so it is never retried.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Literal

import aiosmtplib

from gateway.contract import AmbiguousSendError, PermanentError, TransientError

Security = Literal["starttls", "tls", "none"]


@dataclass(frozen=True, kw_only=True)
class SubmissionResult:
    """What the submission server said."""

    response: str
    #: Recipients the server refused while accepting the others (address -> reply).
    refused: dict[str, str]


def _reply_error(exc: aiosmtplib.SMTPResponseException, what: str) -> Exception:
    message = f"{what}: {exc.code} {exc.message}"
    if 400 <= exc.code < 500:
        return TransientError(message, code=f"smtp_{exc.code}")
    return PermanentError(message, code=f"smtp_{exc.code}")


async def submit(
    message: EmailMessage,
    *,
    host: str,
    port: int,
    security: Security,
    username: str | None,
    password: str | None,
    timeout: float,
    tls_context: ssl.SSLContext | None = None,
    envelope_from: str | None = None,
) -> SubmissionResult:
    """Submit ``message`` to its ``To`` recipients; raises the contract's error types."""
    client = aiosmtplib.SMTP(
        hostname=host,
        port=port,
        timeout=timeout,
        use_tls=security == "tls",
        start_tls=security == "starttls",
        tls_context=tls_context,
        validate_certs=tls_context is None,
    )
    try:
        await client.connect()
        if username is not None and password is not None:
            await client.login(username, password)
    except aiosmtplib.SMTPAuthenticationError as exc:
        client.close()
        raise PermanentError(f"smtp login refused: {exc.code}", code="smtp_auth") from exc
    except aiosmtplib.SMTPResponseException as exc:
        client.close()
        raise _reply_error(exc, "smtp session refused") from exc
    except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
        # Nothing was submitted yet: safe to retry.
        client.close()
        raise TransientError(f"smtp connect failed: {exc!r}", code="smtp_connect") from exc
    try:
        refused, response = await client.send_message(message, sender=envelope_from)
    except aiosmtplib.SMTPRecipientsRefused as exc:
        codes = [e.code for e in exc.recipients]
        text = "; ".join(f"{e.recipient}: {e.code} {e.message}" for e in exc.recipients)
        if any(400 <= c < 500 for c in codes):
            raise TransientError(f"recipients refused: {text}", code="smtp_rcpt") from exc
        raise PermanentError(f"recipients refused: {text}", code="smtp_rcpt") from exc
    except aiosmtplib.SMTPResponseException as exc:
        raise _reply_error(exc, "smtp refused the message") from exc
    except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
        raise AmbiguousSendError(f"smtp connection lost during submission: {exc!r}") from exc
    finally:
        if client.is_connected:
            try:
                await client.quit()
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                client.close()
    return SubmissionResult(
        response=response, refused={r: f"{e.code} {e.message}" for r, e in refused.items()}
    )
