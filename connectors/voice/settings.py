"""The part of a ``connectors.voice.<provider>`` config section every voice connector has."""

from __future__ import annotations

from typing import Generic, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from connectors.voice.flow import VoiceFlows

_Account = TypeVar("_Account", bound=BaseModel)


class VoiceSettings(BaseModel, Generic[_Account]):
    """Accounts (a provider's own account model), call flows, how answer-webhook
    events are published, and the account of call commands that name none.

    A provider's settings subclass ``VoiceSettings[<its account model>]`` and
    add their own keys.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    accounts: dict[str, _Account] = Field(min_length=1)
    #: The call flows (see :mod:`connectors.voice.flow`) and which number runs which.
    call_flows: VoiceFlows
    #: Seconds an answer webhook waits for its events' confirm before answering
    #: anyway (the rest is retried in the background).
    answer_publish_wait: float = Field(default=0.05, ge=0, le=2)
    #: Unconfirmed answer-event batches kept for retry before new ones are dropped.
    max_pending_events: int = Field(default=10_000, ge=1)
    #: Seconds ``stop`` waits for unconfirmed answer events.
    drain_timeout: float = Field(default=5.0, ge=0)
    #: Account of a call command that names none (default: the first account).
    default_account: str | None = None

    @model_validator(mode="after")
    def _known_default(self) -> Self:
        if self.default_account is not None and self.default_account not in self.accounts:
            raise ValueError(f"default_account {self.default_account!r} is not in accounts")
        return self

    def command_account(self, requested: str) -> str:
        """The account key a call command runs on: the one it names, else
        ``default_account``, else the first account (which may be unknown when
        the command names it: the connector rejects that)."""
        return requested or self.default_account or next(iter(self.accounts))
