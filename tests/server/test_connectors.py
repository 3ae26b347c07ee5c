"""The connector directory: send targets, defaults, and connectors that fail to load."""

from __future__ import annotations

import grpc
import pytest

from gateway.api.v1.gateway_service_pb2 import ConnectorHealth
from gateway.contract import ConnectorNotFoundError, registry
from gateway.contract.connector import ConnectorSpec
from gateway.server.connectors import ConnectorDirectory, LocalProbe
from gateway.server.errors import RpcError


def test_default_provider_picks_among_several_enabled() -> None:
    directory = ConnectorDirectory(
        {"sms.twilio", "sms.vonage"}, default_providers={"sms": "vonage"}
    )
    assert directory.resolve("sms").name == "sms.vonage"
    assert directory.resolve("sms", "twilio").name == "sms.twilio"
    with pytest.raises(RpcError) as err:
        ConnectorDirectory({"sms.twilio", "sms.vonage"}).resolve("sms")
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert err.value.reason == "AMBIGUOUS_PROVIDER"


async def test_a_connector_that_fails_to_load_is_listed_broken(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_load = registry.load

    def load(name: str) -> ConnectorSpec:
        if name == "fax.broken":
            raise ConnectorNotFoundError("connector 'fax.broken' failed to load: No module")
        return real_load(name)

    monkeypatch.setattr(registry, "available", lambda: ["fax.broken", "sms.twilio"])
    monkeypatch.setattr(registry, "load", load)
    directory = ConnectorDirectory(
        {"fax.broken", "sms.twilio"}, probe=LocalProbe(lambda: ["sms.twilio"])
    )
    infos = {i.name: i for i in await directory.describe()}
    assert infos["fax.broken"].health == ConnectorHealth.CONNECTOR_HEALTH_BROKEN
    assert "failed to load" in infos["fax.broken"].health_detail
    assert infos["sms.twilio"].health == ConnectorHealth.CONNECTOR_HEALTH_SERVING
    with pytest.raises(RpcError) as err:
        directory.resolve("fax")
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert err.value.reason == "CONNECTOR_BROKEN"
