"""Shipped test doubles: in-memory bus, fake provider servers, conformance suite."""

from gateway.runtime.memory_bus import InMemoryBus

__all__ = ["InMemoryBus"]
