"""Prometheus metrics of the gateway's gRPC API (served when ``gateway.metrics_port`` is set)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

RPCS = Counter(
    "gateway_grpc_requests_total", "gRPC calls by method and status code", ["method", "code"]
)
RPC_SECONDS = Histogram(
    "gateway_grpc_request_seconds",
    "gRPC call duration by method (streams: until they end)",
    ["method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
MESSAGES = Counter(
    "gateway_messages_total",
    "SendMessage outcomes by connector: accepted (new), replayed (same idempotency key)",
    ["connector", "outcome"],
)
CALL_COMMANDS = Counter(
    "gateway_grpc_call_commands_total",
    "SendCallCommand outcomes by connector: accepted (new), replayed (same idempotency key)",
    ["connector", "outcome"],
)
