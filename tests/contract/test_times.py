"""Timestamp conversions agree with protobuf's own FromDatetime / ToDatetime."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta, timezone

from google.protobuf.timestamp_pb2 import Timestamp

from gateway.contract.times import set_timestamp, timestamp, to_datetime


def _generated_datetimes() -> list[datetime]:
    rng = random.Random(7)
    zones = [None, UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-11))]
    edges = [
        datetime(1970, 1, 1, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),  # before the epoch
        datetime(1, 1, 2, tzinfo=UTC),
        datetime(9999, 12, 30, 23, 59, 59, 999_999, tzinfo=UTC),
        datetime(2026, 11, 23, 12, 0, 0, 1),  # naive: UTC
    ]
    generated = [
        datetime(1900, 1, 1) + timedelta(microseconds=rng.randrange(0, 250 * 365 * 86_400 * 10**6))
        for _ in range(2_000)
    ]
    return edges + [d.replace(tzinfo=rng.choice(zones)) for d in generated]


def test_set_timestamp_matches_protobuf() -> None:
    for when in _generated_datetimes():
        ours, theirs = Timestamp(), Timestamp()
        set_timestamp(ours, when)
        theirs.FromDatetime(when)
        assert (ours.seconds, ours.nanos) == (theirs.seconds, theirs.nanos), when
        assert timestamp(when) == theirs


def test_to_datetime_matches_protobuf() -> None:
    rng = random.Random(3)
    for when in _generated_datetimes():
        ts = timestamp(when)
        ts.nanos += rng.randrange(0, 1_000)  # sub-microsecond digits are truncated by both
        assert to_datetime(ts) == ts.ToDatetime(tzinfo=UTC)
        assert to_datetime(ts).tzinfo is UTC
