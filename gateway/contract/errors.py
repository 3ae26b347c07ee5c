"""Error types that carry the retry decision.

A connector raises these; the runtime turns them into HTTP answers (webhooks),
retries or terminal statuses (sends), ack/nack decisions (consumers). Code that
catches a broad exception must re-raise it as one of these, so that no failure
is hidden.
"""

from __future__ import annotations


class ConnectorError(Exception):
    """Base of every error a connector raises on purpose."""

    #: Short machine-readable reason, e.g. "rate_limited", "21211".
    code: str = "error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class TransientError(ConnectorError):
    """The operation may succeed if repeated (timeouts, 429, 5xx, broker down).

    ``retry_after`` is the provider's own hint (seconds), e.g. from a
    ``Retry-After`` header; the runtime waits at least that long.
    """

    code = "transient"

    def __init__(
        self, message: str, *, code: str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after


class PermanentError(ConnectorError):
    """Repeating the operation cannot succeed (invalid number, 4xx validation)."""

    code = "permanent"


class AmbiguousSendError(ConnectorError):
    """The provider may or may not have accepted a send (e.g. a read timeout
    after the request went out). Never retried unless the provider takes an
    idempotency key; the message ends FAILED with reason ``ambiguous_send``.
    """

    code = "ambiguous_send"


class AuthError(ConnectorError):
    """A webhook failed authentication (bad, missing or stale signature).

    Answered with ``status`` (401 or 403) and never published.
    """

    code = "unauthorized"

    def __init__(self, message: str, *, status: int = 401, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.status = status


class BadRequestError(ConnectorError):
    """A webhook or command is malformed (bad JSON/form, unparsable number).

    Answered with a 4xx (``status``) and a clear reason; never published.
    """

    code = "bad_request"

    def __init__(self, message: str, *, status: int = 400, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.status = status


class ConfigError(ConnectorError):
    """The configuration is missing, invalid or uses an example secret.

    Raised at start-up: a service refuses to start rather than run half-configured.
    """

    code = "config"


class ConnectorNotFoundError(LookupError):
    """No connector is registered under the requested name."""
