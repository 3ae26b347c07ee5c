"""The connector contract: everything a connector may import besides ``gateway.api.v1``."""

from gateway.contract.addresses import mask_email, mask_phone, normalize_phone
from gateway.contract.connector import (
    CallControl,
    CallResult,
    Connector,
    ConnectorContext,
    ConnectorSpec,
    Inbound,
    Logger,
    SendResult,
    WebhookHandler,
    WebhookReply,
    WebhookRequest,
    WebhookRoute,
)
from gateway.contract.errors import (
    AmbiguousSendError,
    AuthError,
    BadRequestError,
    ConfigError,
    ConnectorError,
    ConnectorNotFoundError,
    PermanentError,
    TransientError,
)
from gateway.contract.ids import inbound_event_id, new_id
from gateway.contract.secrets import Secret

__all__ = [
    "AmbiguousSendError",
    "AuthError",
    "BadRequestError",
    "CallControl",
    "CallResult",
    "ConfigError",
    "Connector",
    "ConnectorContext",
    "ConnectorError",
    "ConnectorNotFoundError",
    "ConnectorSpec",
    "Inbound",
    "Logger",
    "PermanentError",
    "Secret",
    "SendResult",
    "TransientError",
    "WebhookHandler",
    "WebhookReply",
    "WebhookRequest",
    "WebhookRoute",
    "inbound_event_id",
    "mask_email",
    "mask_phone",
    "new_id",
    "normalize_phone",
]
