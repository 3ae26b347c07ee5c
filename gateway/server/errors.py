"""gRPC errors with google.rpc details.

Handlers raise :class:`RpcError`; the servicer turns it into a status with
rich details (``google.rpc.BadRequest`` field violations for INVALID_ARGUMENT),
which clients read with ``grpc_status.rpc_status.from_call``.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from google.protobuf import any_pb2
from google.rpc import (  # type: ignore[import-untyped]
    code_pb2,
    error_details_pb2,
    status_pb2,
)
from grpc_status import rpc_status

from gateway.server.content import Violation

#: ``google.rpc.ErrorInfo.domain`` of every error the gateway raises.
ERROR_DOMAIN = "channel-gateway"


class RpcError(Exception):
    """An error answer: a gRPC code, a message, optional field violations and reason."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        violations: Sequence[Violation] = (),
        reason: str = "",
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.violations = tuple(violations)
        self.reason = reason

    def to_status(self) -> grpc.Status:
        """The ``grpc.Status`` (with ``grpc-status-details-bin`` trailing metadata)."""
        details: list[any_pb2.Any] = []
        if self.violations:
            bad_request = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=v.field, description=v.description
                    )
                    for v in self.violations
                ]
            )
            packed = any_pb2.Any()
            packed.Pack(bad_request)
            details.append(packed)
        if self.reason:
            packed = any_pb2.Any()
            packed.Pack(error_details_pb2.ErrorInfo(reason=self.reason, domain=ERROR_DOMAIN))
            details.append(packed)
        status = status_pb2.Status(code=_CODES[self.code], message=self.message, details=details)
        return rpc_status.to_status(status)


_CODES: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: code_pb2.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION: code_pb2.FAILED_PRECONDITION,
    grpc.StatusCode.NOT_FOUND: code_pb2.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS: code_pb2.ALREADY_EXISTS,
    grpc.StatusCode.UNAVAILABLE: code_pb2.UNAVAILABLE,
    grpc.StatusCode.OUT_OF_RANGE: code_pb2.OUT_OF_RANGE,
    grpc.StatusCode.RESOURCE_EXHAUSTED: code_pb2.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED: code_pb2.DEADLINE_EXCEEDED,
    grpc.StatusCode.INTERNAL: code_pb2.INTERNAL,
    grpc.StatusCode.ABORTED: code_pb2.ABORTED,
}


def invalid(violations: Sequence[Violation], message: str = "") -> RpcError:
    """INVALID_ARGUMENT listing every violation (the message names the first)."""
    first = violations[0]
    more = f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""
    text = message or f"{first.field}: {first.description}{more}"
    return RpcError(grpc.StatusCode.INVALID_ARGUMENT, text, violations=violations)
