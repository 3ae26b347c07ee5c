"""Config models shared by the email connectors."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from connectors.email.mime import MimeLimits


class MimeCaps(BaseModel):
    """Caps on inbound mail (hostile-mail protection); see :class:`MimeLimits`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_parts: int = Field(default=500, gt=0)
    max_depth: int = Field(default=30, gt=0)
    max_header_bytes: int = Field(default=64 * 1024, gt=0)
    max_total_header_bytes: int = Field(default=1024 * 1024, gt=0)
    max_encoded_words: int = Field(default=2000, gt=0)
    #: A mail whose parse takes longer is quarantined.
    parse_timeout: float = Field(default=30.0, gt=0)
    #: Parser worker processes.
    workers: int = Field(default=1, ge=1)

    def limits(self, max_bytes: int) -> MimeLimits:
        """The parser's limits for messages of at most ``max_bytes``."""
        return MimeLimits(
            max_bytes=max_bytes,
            max_parts=self.max_parts,
            max_depth=self.max_depth,
            max_header_bytes=self.max_header_bytes,
            max_total_header_bytes=self.max_total_header_bytes,
            max_encoded_words=self.max_encoded_words,
        )
