"""Protobuf ``Timestamp`` <-> ``datetime``, for connectors and the runtime.

The same values as protobuf's ``FromDatetime`` / ``ToDatetime(tzinfo=UTC)``
(the tests compare them), by datetime arithmetic instead of protobuf's
pure-Python conversion through a time tuple: every inbound event sets two
timestamps and every publish reads one back, and the conversion was a
tenth of mapping a webhook.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from google.protobuf.timestamp_pb2 import Timestamp

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def set_timestamp(ts: Timestamp, when: datetime) -> None:
    """Set ``ts`` to ``when``; a naive ``when`` is taken as UTC (as protobuf does)."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    delta = when - _EPOCH
    ts.seconds = delta.days * 86_400 + delta.seconds
    ts.nanos = delta.microseconds * 1_000


def timestamp(when: datetime) -> Timestamp:
    """``when`` as a new protobuf Timestamp (naive means UTC)."""
    ts = Timestamp()
    set_timestamp(ts, when)
    return ts


def to_datetime(ts: Timestamp) -> datetime:
    """``ts`` as an aware UTC datetime (nanoseconds truncated to microseconds)."""
    return _EPOCH + timedelta(seconds=ts.seconds, microseconds=ts.nanos // 1_000)
