"""Config shared by the Meta connectors: the app's secret and verify token, the Graph API."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from connectors.social.meta.graph import DEFAULT_GRAPH_BASE, DEFAULT_GRAPH_VERSION
from gateway.contract import Secret


class MetaAppSettings(BaseModel):
    """The Meta app whose webhooks a connector receives."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Signs every webhook (``X-Hub-Signature-256``).
    app_secret: Secret
    #: What we told Meta to send in the subscription handshake.
    verify_token: Secret
    graph_base_url: str = DEFAULT_GRAPH_BASE
    graph_version: str = Field(default=DEFAULT_GRAPH_VERSION, pattern=r"^v[0-9]+\.[0-9]+$")
    default_account: str | None = None
