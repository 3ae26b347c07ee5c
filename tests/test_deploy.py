"""Deployment artefacts agree with the code: example config, broker definitions, compose, k8s.

The example config must load and validate with every connector it names; the RabbitMQ
definitions must be what the runtime declares (checked on the real broker, in a throw-away
vhost); the container and Kubernetes files must probe the paths and port the runtime serves.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote, urlsplit, urlunsplit

import aio_pika
import pytest
import yaml
from pydantic import BaseModel

from connectors.email.settings import MimeCaps
from connectors.voice.flow import (
    Enqueue,
    Forward,
    Gather,
    Goto,
    Hangup,
    Play,
    Record,
    Say,
    VoiceFlows,
)
from gateway.contract import registry
from gateway.contract.errors import ConfigError
from gateway.ledger.ingest import DEFAULT_QUEUE as STATUS_QUEUE
from gateway.ledger.ingest import StatusIngestor
from gateway.runtime.amqp_bus import AmqpBus
from gateway.runtime.codec import encode_event
from gateway.runtime.config import (
    BrokerSettings,
    DedupSettings,
    HttpSettings,
    RuntimeSettings,
    SendSettings,
    SpoolSettings,
    TelemetrySettings,
    load_config,
)
from gateway.runtime.idempotency import MemoryIdempotencyStore
from gateway.runtime.ingress import build_app
from gateway.runtime.memory_bus import InMemoryBus
from gateway.runtime.service import Service
from gateway.runtime.topology import (
    COMMANDS_EXCHANGE,
    DEAD_EXCHANGE,
    EVENTS_EXCHANGE,
    topic_matches,
)
from gateway.server.settings import GatewaySettings, gateway_settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
EXAMPLE = DEPLOY / "config.example.yaml"
DEFINITIONS = DEPLOY / "rabbitmq" / "definitions.json"
GEN_DEFINITIONS = ROOT / "scripts" / "gen_definitions.py"

# -- helpers -----------------------------------------------------------------------------------


def _secret_refs(node: Any) -> Iterator[tuple[str, str]]:
    """Every ``{env: NAME}`` / ``{file: PATH}`` reference in a parsed config, in order."""
    if isinstance(node, dict):
        if len(node) == 1 and next(iter(node)) in ("env", "file"):
            ((source, where),) = node.items()
            yield source, where
            return
        for value in node.values():
            yield from _secret_refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _secret_refs(value)


#: Each connector service and the channels it hosts (``channel-gateway run <service>``).
SERVICE_CHANNELS = {
    "email": ("email",),
    "sms": ("sms",),
    "social": ("whatsapp", "messenger", "instagram", "telegram"),
    "voice": ("voice",),
}


def _service_secret_refs(example_raw: dict[str, Any], service: str) -> list[tuple[str, str]]:
    """The secret references of the connector sections one service hosts: a service
    validates (and so needs the secrets of) only the connectors it runs."""
    channels = SERVICE_CHANNELS[service]
    return [
        ref
        for name, section in example_raw["connectors"].items()
        if name.split(".")[0] in channels
        for ref in _secret_refs(section)
    ]


def _remap_files(node: Any, files: dict[str, Path]) -> Any:
    """A copy of ``node`` whose ``{file: PATH}`` references point at ``files[PATH]``."""
    if isinstance(node, dict):
        if set(node) == {"file"}:
            return {"file": str(files[node["file"]])}
        return {k: _remap_files(v, files) for k, v in node.items()}
    if isinstance(node, list):
        return [_remap_files(v, files) for v in node]
    return node


def _rsa_private_key_pem() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


@pytest.fixture(scope="module")
def example_raw() -> dict[str, Any]:
    data = yaml.safe_load(EXAMPLE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture
def secret_env(example_raw: dict[str, Any]) -> dict[str, str]:
    """Random, non-example values for every environment secret the example names."""
    names = [where for source, where in _secret_refs(example_raw) if source == "env"]
    assert names, "the example config names no environment secret"
    return {name: "s3cr3t-" + secrets.token_hex(16) for name in names}


@pytest.fixture
def secret_files(example_raw: dict[str, Any], tmp_path: Path) -> dict[str, Path]:
    """A real file for every file secret the example names (private keys get a real key)."""
    files: dict[str, Path] = {}
    for source, where in _secret_refs(example_raw):
        if source != "file":
            continue
        path = tmp_path / "secrets" / Path(where).name
        path.parent.mkdir(exist_ok=True)
        content = _rsa_private_key_pem() if where.endswith(".key") else secrets.token_hex(16)
        path.write_text(content + "\n")
        files[where] = path
    return files


def _with_files(settings: RuntimeSettings, files: dict[str, Path]) -> RuntimeSettings:
    return settings.model_copy(update={"connectors": _remap_files(settings.connectors, files)})


# -- the example config ------------------------------------------------------------------------


def test_example_config_loads_and_every_connector_validates(
    secret_env: dict[str, str], secret_files: dict[str, Path]
) -> None:
    settings = load_config(EXAMPLE, environ=secret_env)
    resolved = _with_files(settings, secret_files)
    assert set(settings.connectors) >= {"sms.twilio", "sms.vonage"}
    for name in settings.connectors:
        spec = registry.load(name)  # registered under that entry-point name
        assert settings.connector_enabled(name)
        validated = resolved.connector_settings(spec, secret_env)
        assert isinstance(validated, spec.settings)

    twilio: Any = resolved.connector_settings(registry.load("sms.twilio"), secret_env)
    assert len(twilio.accounts) >= 2
    assert all(a.numbers or a.messaging_service_sid for a in twilio.accounts.values())
    token_names = [
        settings.connectors["sms.twilio"]["accounts"][k]["auth_token"]["env"]
        for k in twilio.accounts
    ]
    assert [a.auth_token.get_secret_value() for a in twilio.accounts.values()] == [
        secret_env[n] for n in token_names
    ]
    vonage: Any = resolved.connector_settings(registry.load("sms.vonage"), secret_env)
    assert len(vonage.accounts) >= 2
    # One account sends with the API secret, the other with an application key from a file.
    assert {a.application_id is None for a in vonage.accounts.values()} == {True, False}
    keys = [a.private_key for a in vonage.accounts.values() if a.private_key is not None]
    assert keys[0].get_secret_value().startswith("-----BEGIN PRIVATE KEY-----")

    # Email: a listener and a relay; an IMAP mailbox whose password comes from a file.
    smtp: Any = resolved.connector_settings(registry.load("email.smtp"), secret_env)
    assert smtp.inbound is not None
    assert smtp.submission is not None
    assert smtp.submission.password.get_secret_value() == secret_env["SMTP_RELAY_PASSWORD"]
    imap: Any = resolved.connector_settings(registry.load("email.imap"), secret_env)
    archive = settings.connectors["email.imap"]["mailboxes"]["archive"]["password"]["file"]
    assert imap.mailboxes["archive"].password.get_secret_value() == (
        secret_files[archive].read_text().strip()
    )


def _keys_of(model: type[BaseModel]) -> set[str]:
    return set(model.model_fields)


def _model_of(annotation: Any) -> type[BaseModel]:
    """The settings model an annotation names (``Model`` or ``Model | None``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    (model,) = [
        a
        for a in getattr(annotation, "__args__", ())
        if isinstance(a, type) and issubclass(a, BaseModel)
    ]
    return model


def test_example_config_lists_every_key_with_its_default(example_raw: dict[str, Any]) -> None:
    """A "fully commented example": every settings key appears, runtime sections at their
    defaults (the comments say "default ..."; a changed default must change the example)."""
    sections: dict[str, type[BaseModel]] = {
        "http": HttpSettings,
        "broker": BrokerSettings,
        "dedup": DedupSettings,
        "telemetry": TelemetrySettings,
        "send": SendSettings,
    }
    assert set(example_raw) == _keys_of(RuntimeSettings)
    for name, model in sections.items():
        assert set(example_raw[name]) == _keys_of(model), name
        assert model.model_validate(example_raw[name]) == model(), name
    # The gateway section: every key, defaults except the provider choice the example needs.
    gateway = gateway_settings(load_config(EXAMPLE, environ={}))
    assert set(example_raw["gateway"]) == _keys_of(GatewaySettings)
    assert gateway.model_copy(update={"default_providers": {}}) == GatewaySettings()
    assert gateway.default_providers == {"sms": "twilio"}
    for name, section in example_raw["connectors"].items():
        spec = registry.load(name)
        assert set(section) - {"enabled"} == _keys_of(spec.settings), name
        # Accounts are "accounts", "bots" for Telegram, "mailboxes" for email.imap; email.smtp
        # has none (one listener, one relay).
        collections = {"accounts", "bots", "mailboxes"} & set(spec.settings.model_fields)
        assert len(collections) <= 1, name
        assert collections or name == "email.smtp", name
        for accounts in collections:
            account_model = spec.settings.model_fields[accounts].annotation
            account_type = account_model.__args__[1]  # type: ignore[union-attr]
            # Every account key appears in at least one account (the accounts show
            # alternatives).
            shown = set().union(*(set(a) for a in section[accounts].values()))
            assert shown == _keys_of(account_type), f"{name}.{accounts}"
        # Nested sections list every key: whatsapp.meta's media fetch caps, the email
        # sections' hostile-mail caps, email.smtp's listener and relay, the voice call flows.
        for key in ("media", "mime", "inbound", "submission", "call_flows"):
            if isinstance(section.get(key), dict):
                nested = _model_of(spec.settings.model_fields[key].annotation)
                assert set(section[key]) == _keys_of(nested), f"{name}.{key}"
        if "mime" in section:  # shown at its defaults, as the comments say
            assert MimeCaps.model_validate(section["mime"]) == MimeCaps(), f"{name}.mime"


def test_example_voice_flows_show_every_step_and_route_every_call_event(
    example_raw: dict[str, Any], secret_env: dict[str, str]
) -> None:
    """The voice sections: one flow definition shared by both providers showing every step
    type, a voice number per provider, and a subscription binding that routes every event
    the voice connectors publish (mandatory publishes: an unbound call event is a failure)."""
    settings = load_config(EXAMPLE, environ=secret_env)
    twilio: Any = settings.connector_settings(registry.load("voice.twilio"), secret_env)
    vonage: Any = settings.connector_settings(registry.load("voice.vonage"), secret_env)
    assert twilio.call_flows == vonage.call_flows  # the YAML anchor, resolved
    flows: VoiceFlows = twilio.call_flows
    kinds = {
        type(action)
        for flow in flows.flows.values()
        for actions in flow.steps.values()
        for action in actions
    }
    assert kinds == {Say, Play, Gather, Record, Forward, Enqueue, Goto, Hangup}
    forwards = [
        action.forward
        for flow in flows.flows.values()
        for actions in flow.steps.values()
        for action in actions
        if isinstance(action, Forward)
    ]
    assert {f.number is not None for f in forwards} == {True, False}  # a number and a SIP URI
    # Each provider's voice number answers with a flow: the Twilio SMS account's first number
    # and the Vonage main account's.
    sms_twilio = example_raw["connectors"]["sms.twilio"]["accounts"]["main"]["numbers"][0]
    sms_vonage = example_raw["connectors"]["sms.vonage"]["accounts"]["main"]["numbers"][0]
    assert flows.numbers.keys() >= {sms_twilio, sms_vonage}
    # The voice accounts are the SMS accounts: same account, same secret variable.
    assert (
        twilio.accounts["main"].account_sid
        == (example_raw["connectors"]["sms.twilio"]["accounts"]["main"]["account_sid"])
    )
    assert (
        twilio.accounts["main"].auth_token.get_secret_value()
        == (secret_env["TWILIO_MAIN_AUTH_TOKEN"])
    )
    assert (
        vonage.accounts["main"].signature_secret.get_secret_value()
        == (secret_env["VONAGE_MAIN_SIGNATURE_SECRET"])
    )

    bindings = [b for sub in settings.subscriptions for b in sub.bindings]
    assert "call.#" in bindings
    for name in ("voice.twilio", "voice.vonage"):
        spec = registry.load(name)
        for event_type in spec.manifest.event_types:
            key = f"{event_type}.{spec.channel}.{spec.provider}"
            assert any(topic_matches(b, key) for b in bindings), key


def test_example_config_holds_no_literal_secret(example_raw: dict[str, Any]) -> None:
    refs = list(_secret_refs(example_raw))
    assert {source for source, _ in refs} == {"env", "file"}
    text = EXAMPLE.read_text()
    for _, where in refs:
        assert where in text


def test_missing_env_secret_stops_start_with_the_field_and_variable(
    secret_env: dict[str, str], secret_files: dict[str, Path]
) -> None:
    del secret_env["TWILIO_MARKETING_AUTH_TOKEN"]
    settings = _with_files(load_config(EXAMPLE, environ=secret_env), secret_files)
    with pytest.raises(ConfigError) as info:
        settings.connector_settings(registry.load("sms.twilio"), secret_env)
    message = str(info.value)
    assert "connectors.sms.twilio" in message
    assert "accounts.marketing.auth_token" in message
    assert "environment variable TWILIO_MARKETING_AUTH_TOKEN is not set" in message


def test_missing_secret_file_and_example_values_are_refused(
    secret_env: dict[str, str], secret_files: dict[str, Path]
) -> None:
    settings = load_config(EXAMPLE, environ=secret_env)
    with pytest.raises(ConfigError) as info:  # the file paths of the example do not exist here
        settings.connector_settings(registry.load("sms.vonage"), secret_env)
    assert "accounts.eu.private_key" in str(info.value)
    assert "cannot read secret file /etc/channel-gateway/secrets/vonage-eu-private.key" in str(
        info.value
    )

    secret_env["VONAGE_MAIN_SIGNATURE_SECRET"] = "changeme"
    with pytest.raises(ConfigError) as info:
        _with_files(settings, secret_files).connector_settings(
            registry.load("sms.vonage"), secret_env
        )
    assert "accounts.main.signature_secret" in str(info.value)
    assert "example value" in str(info.value)


def test_cli_refuses_to_start_without_a_secret(secret_env: dict[str, str], tmp_path: Path) -> None:
    """What an operator sees: exit status 2 and one line naming the field, before any
    connection is attempted (the broker URL points at a closed port)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHANNEL_GATEWAY")}
    env.update(secret_env)
    del env["TWILIO_MAIN_AUTH_TOKEN"]
    env["CHANNEL_GATEWAY__BROKER__URL"] = "amqp://guest:guest@127.0.0.1:1/"
    env["CHANNEL_GATEWAY__HTTP__PORT"] = "0"
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "--config", str(EXAMPLE), "run", "sms.twilio"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2, result.stderr
    assert "accounts.main.auth_token" in result.stderr
    assert "TWILIO_MAIN_AUTH_TOKEN is not set" in result.stderr
    assert "cannot connect" not in result.stderr


# -- RabbitMQ definitions ----------------------------------------------------------------------


def test_definitions_are_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, str(GEN_DEFINITIONS), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _gen_definitions() -> Any:
    """scripts/gen_definitions.py as a module (scripts/ is not a package)."""
    sys.path.insert(0, str(GEN_DEFINITIONS.parent))
    try:
        import gen_definitions
    finally:
        sys.path.remove(str(GEN_DEFINITIONS.parent))
    return gen_definitions


def test_definitions_check_fails_on_drift(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stale = tmp_path / "definitions.json"
    stale.write_text(
        DEFINITIONS.read_text().replace('"x-delivery-limit": 5', '"x-delivery-limit": 9')
    )
    assert _gen_definitions().main(["--check", "--output", str(stale)]) == 1
    out = capsys.readouterr().out
    assert "out of date" in out
    assert '-        "x-delivery-limit": 9,' in out
    assert _gen_definitions().main(["--check", "--output", str(tmp_path / "missing.json")]) == 1
    assert "cannot read" in capsys.readouterr().out


def _rabbitmqctl(*args: str) -> subprocess.CompletedProcess[str]:
    ctl = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    result = subprocess.run([ctl, "-q", *args], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"rabbitmqctl {' '.join(args)}: {result.stderr}"
    return result


def _import_definitions(text: str) -> None:
    # rabbitmqctl runs as the rabbitmq user, who cannot read pytest's private tmp directories
    # (and this version does not take the file on stdin): a world-readable directory of our own.
    shared = Path(tempfile.mkdtemp(prefix="cg-definitions-"))
    try:
        shared.chmod(0o755)
        path = shared / "definitions.json"
        path.write_text(text)
        path.chmod(0o644)
        _rabbitmqctl("import_definitions", str(path))
    finally:
        shutil.rmtree(shared)


def _vhost_url(url: str, vhost: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + quote(vhost, safe="")))


@pytest.mark.rabbitmq
async def test_definitions_provision_what_the_runtime_declares(
    rabbitmq_url: str, unique: str
) -> None:
    """Import the definitions into a fresh vhost of the real broker; commands route to the
    connector queues before any service ran, and the runtime's own declarations (same names,
    same arguments, or RabbitMQ refuses them) succeed on top."""
    gen_definitions = _gen_definitions()
    vhost = f"cg-test-{unique}"
    user = urlsplit(rabbitmq_url).username or "guest"
    definitions = json.loads(gen_definitions.render(vhost=vhost))
    # The test's broker user may use the throw-away vhost (imported in the same call).
    definitions["permissions"] = [
        {"user": user, "vhost": vhost, "configure": ".*", "write": ".*", "read": ".*"}
    ]
    _import_definitions(json.dumps(definitions))
    bus = AmqpBus(_vhost_url(rabbitmq_url, vhost))
    try:
        await bus.connect()
        # Routed (mandatory + confirm) only if the imported bindings exist.
        from gateway.api.v1.envelope_pb2 import Event

        message = encode_event(Event(id=f"probe-{unique}", type="probe", channel="sms"))
        for name in registry.available():
            channel, provider = name.split(".", 1)
            await bus.publish(COMMANDS_EXCHANGE, f"send.{channel}.{provider}", message, timeout=5)
        # Connectors that take call commands (voice) have a call queue too.
        callers = [n for n in registry.available() if registry.load(n).manifest.call_actions]
        for name in callers:
            channel, provider = name.split(".", 1)
            await bus.publish(COMMANDS_EXCHANGE, f"call.{channel}.{provider}", message, timeout=5)
        await bus.publish(DEAD_EXCHANGE, "anything.at.all", message, timeout=5)
        await bus.publish(EVENTS_EXCHANGE, "message.status.sms.twilio", message, timeout=5)
        # Each probe landed in the queue the imported bindings route it to.
        connection = await aio_pika.connect(_vhost_url(rabbitmq_url, vhost))
        try:
            channel = await connection.channel()
            for queue_name in (
                "channels.dead-letters",
                STATUS_QUEUE,
                *(f"connector.{name}.send" for name in registry.available()),
                *(f"connector.{name}.call" for name in callers),
            ):
                queue = await channel.get_queue(queue_name, ensure=True)
                got = await queue.get(no_ack=True, fail=False, timeout=5)
                assert got is not None, queue_name
                assert got.message_id == f"probe-{unique}"
        finally:
            await connection.close()

        service = Service(
            RuntimeSettings(),
            registry.available(),
            bus=InMemoryBus(),
            store=MemoryIdempotencyStore(),
        )
        runtime = service.topology([registry.load(n) for n in registry.available()])
        await bus.declare(runtime)  # PRECONDITION_FAILED if any argument differed
        assert {q.name for q in runtime.queues} == {
            "channels.dead-letters",
            *(f"connector.{name}.send" for name in registry.available()),
            *(f"connector.{name}.call" for name in callers),
        }
        # The gateway service's status queue, as its ingestor declares it (topology() only
        # reads the queue name and delivery limit; the ledger is not used).
        ingestor = StatusIngestor(
            bus, cast(Any, None), delivery_limit=RuntimeSettings().broker.delivery_limit
        )
        assert ingestor.queue == STATUS_QUEUE
        await bus.declare(ingestor.topology())
        assert {e.name for e in runtime.exchanges} == {
            EVENTS_EXCHANGE,
            COMMANDS_EXCHANGE,
            DEAD_EXCHANGE,
        }
    finally:
        await bus.close()
        _rabbitmqctl("delete_vhost", vhost)


# -- containers and Kubernetes -----------------------------------------------------------------


def _load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _k8s(component: str = "sms") -> dict[str, dict[str, Any]]:
    """The manifests of one component (app.kubernetes.io/component), plus the shared ones
    (no component label: the ConfigMap), by kind; a headless Service (the one a StatefulSet
    names) is under "HeadlessService"."""
    docs: dict[str, dict[str, Any]] = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in _load_all(path):
            labels = doc.get("metadata", {}).get("labels", {})
            if labels.get("app.kubernetes.io/component", component) == component:
                kind = doc["kind"]
                if kind == "Service" and doc["spec"].get("clusterIP") == "None":
                    kind = "HeadlessService"
                assert kind not in docs, f"two {kind} for {component}"
                docs[kind] = doc
    return docs


def _workload(docs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The component's one Deployment or StatefulSet."""
    (workload,) = [docs[k] for k in ("Deployment", "StatefulSet") if k in docs]
    return workload


def _spooling_services(example_raw: dict[str, Any]) -> set[str]:
    """The connector services hosting a connector that spools on outage (so they open a spool
    file when spool.enabled)."""
    return {
        service
        for service, channels in SERVICE_CHANNELS.items()
        for name in example_raw["connectors"]
        if name.split(".")[0] in channels and registry.load(name).spool_on_outage
    }


def _quantity_bytes(quantity: str) -> int:
    """A Kubernetes storage quantity with a binary suffix (1Gi, 512Mi) in bytes."""
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)", quantity)
    assert match is not None, quantity
    power = "KiMiGiTi".index(match.group(2)) // 2 + 1
    return int(match.group(1)) << (10 * power)


def test_runtime_serves_the_probed_paths() -> None:
    async def ready() -> dict[str, bool]:
        return {}

    app = build_app([], max_body_bytes=1024, public_base_url=None, readiness=ready)
    paths = {r.resource.canonical for r in app.router.routes() if r.resource is not None}
    assert {"/healthz", "/readyz", "/metrics"} <= paths


def test_dockerfile_runs_the_sms_service_as_non_root() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    port = HttpSettings().port
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    assert re.search(r"^RUN pip install \.", text, re.M)
    user = re.search(r"^USER (\S+)$", text, re.M)
    assert user is not None
    assert user.group(1).split(":")[0] not in ("root", "0")
    assert re.search(rf"^EXPOSE {port}$", text, re.M)
    joined = text.replace("\\\n", " ")  # Dockerfile line continuations
    healthcheck = re.search(r"^HEALTHCHECK .*$", joined, re.M)
    assert healthcheck is not None
    assert f"http://127.0.0.1:{port}/healthz" in healthcheck.group(0)
    assert 'ENTRYPOINT ["channel-gateway"]' in text
    assert 'CMD ["run", "sms"]' in text
    for copied in re.findall(r"^COPY (\S+)", text, re.M):
        assert (ROOT / copied).exists(), copied


@pytest.mark.parametrize("service", sorted(SERVICE_CHANNELS))
def test_compose_wires_broker_redis_and_the_connector_services(
    example_raw: dict[str, Any], service: str
) -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {
        "rabbitmq",
        "redis",
        "sms",
        "social",
        "email",
        "voice",
        "postgres",
        "gateway",
    }
    port = HttpSettings().port
    # Each service hosts connectors the example configures.
    hosted = {n.split(".")[0] for n in example_raw["connectors"]} & set(SERVICE_CHANNELS[service])
    assert hosted, service

    connector = services[service]
    assert connector["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (DEPLOY / connector["build"]["context"] / connector["build"]["dockerfile"]).is_file()
    assert connector["command"] == ["run", service]
    env = connector["environment"]
    assert env["CHANNEL_GATEWAY__HTTP__HOST"] == "0.0.0.0"
    assert int(env["CHANNEL_GATEWAY__HTTP__PORT"]) == port
    assert env["CHANNEL_GATEWAY__BROKER__URL"].endswith("@rabbitmq:5672/")
    assert env["CHANNEL_GATEWAY__DEDUP__URL"].startswith("redis://redis:")
    assert f"127.0.0.1:{port}/healthz" in " ".join(connector["healthcheck"]["test"])
    # Each service its own host port, the container port the runtime's (listed first).
    (mapping,) = [m for m in connector["ports"] if m.endswith(f":{port}")]
    assert connector["ports"][0] == mapping
    assert len({services[s]["ports"][0].split(":")[0] for s in SERVICE_CHANNELS}) == len(
        SERVICE_CHANNELS
    )
    mounts = {m.split(":")[1]: m.split(":")[0] for m in connector["volumes"]}
    assert mounts[env["CHANNEL_GATEWAY_CONFIG"]] == "./config.example.yaml"
    for source, where in _service_secret_refs(example_raw, service):
        if source == "env":
            assert where in env, f"compose does not pass {where}"
        else:
            assert where in mounts, f"compose does not mount {where}"
    assert set(connector["depends_on"]) == {"rabbitmq", "redis"}

    rabbit = services["rabbitmq"]
    rabbit_mounts = dict(m.split(":")[:2] for m in rabbit["volumes"])
    assert rabbit_mounts["./rabbitmq/definitions.json"].startswith("/etc/rabbitmq/definitions.d/")
    conf_target = rabbit_mounts["./rabbitmq/10-definitions.conf"]
    assert conf_target.startswith("/etc/rabbitmq/conf.d/")
    conf = (DEPLOY / "rabbitmq" / "10-definitions.conf").read_text()
    assert re.search(r"^load_definitions = /etc/rabbitmq/definitions.d$", conf, re.M)


@pytest.mark.parametrize("component", sorted(SERVICE_CHANNELS))
def test_kubernetes_probes_ports_and_secrets_match_the_runtime(
    example_raw: dict[str, Any], component: str
) -> None:
    docs = _k8s(component)
    assert {"Service", "ConfigMap", "PodDisruptionBudget"} <= set(docs)
    deployment, service = _workload(docs), docs["Service"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    port = HttpSettings().port
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == port
    env = {e["name"]: e for e in container["env"]}
    assert env["CHANNEL_GATEWAY__HTTP__HOST"]["value"] == "0.0.0.0"
    assert int(env["CHANNEL_GATEWAY__HTTP__PORT"]["value"]) == port
    assert env["CHANNEL_GATEWAY__DEDUP__URL"]["value"].startswith("redis://")
    assert deployment["spec"]["replicas"] > 1  # hence Redis dedup
    assert container["args"] == ["run", component]

    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    # Draining needs at least a publish timeout plus one provider call after SIGTERM.
    drain = BrokerSettings().publish_timeout + SendSettings().provider_timeout
    assert pod["terminationGracePeriodSeconds"] > drain
    assert pod["securityContext"]["runAsNonRoot"] is True

    # Every secret the config names comes from a Secret: env by secretKeyRef, files by volume.
    secret_names: set[str] = set()
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    refs = _service_secret_refs(example_raw, component)
    assert refs, component
    for source, where in refs:
        if source == "env":
            ref = env[where]["valueFrom"]["secretKeyRef"]
            secret_names.add(ref["name"])
        else:
            directory, filename = where.rsplit("/", 1)
            volume = volumes[mounts[directory]]["secret"]
            secret_names.add(volume["secretName"])
            assert filename in {item["path"] for item in volume["items"]}
    assert "valueFrom" in env["CHANNEL_GATEWAY__BROKER__URL"]  # it carries the password
    assert len(secret_names) == 1

    config_mount = next(
        m
        for m in container["volumeMounts"]
        if m["mountPath"] == env["CHANNEL_GATEWAY_CONFIG"]["value"]
    )
    config_map = volumes[config_mount["name"]]["configMap"]["name"]
    assert docs["ConfigMap"]["metadata"]["name"] == config_map
    assert docs["ConfigMap"]["data"][config_mount["subPath"]] == EXAMPLE.read_text(), (
        "deploy/k8s/configmap.yaml differs from deploy/config.example.yaml; regenerate it "
        "(command in its header)"
    )

    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] in (port, "http")

    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} - {"kustomization.yaml"}


def test_email_service_publishes_smtp_and_keeps_imap_state(example_raw: dict[str, Any]) -> None:
    """The email service's extras: the SMTP port the listener binds, published on 25 (compose
    and Kubernetes), the IMAP state directory on a volume, the TLS files mounted, and a webhook
    body cap that lets the providers' inbound mails through."""
    email = example_raw["connectors"]
    inbound = email["email.smtp"]["inbound"]
    smtp_port = inbound["port"]
    assert smtp_port > 1024  # the containers run as non-root
    state_dir = email["email.imap"]["state_dir"]
    tls_files = {inbound["tls_cert_file"], inbound["tls_key_file"]}
    largest = max(
        email[name]["max_message_bytes"]
        for name in ("email.sendgrid", "email.mailgun", "email.postmark")
    )

    service = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["email"]
    assert f"25:{smtp_port}" in service["ports"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in service["volumes"]}
    assert tls_files <= set(mounts)
    state_volume = mounts[state_dir]
    assert not state_volume.startswith(".")  # a named volume, kept across restarts
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert state_volume in compose["volumes"]
    assert int(service["environment"]["CHANNEL_GATEWAY__HTTP__MAX_BODY_BYTES"]) > largest
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert f"install -d -o 10001 -g 10001 {state_dir}" in dockerfile  # the volume's owner

    docs = _k8s("email")
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["smtp"] == smtp_port
    env = {e["name"]: e for e in container["env"]}
    assert int(env["CHANNEL_GATEWAY__HTTP__MAX_BODY_BYTES"]["value"]) > largest
    volume_mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[volume_mounts[state_dir]]
    for path in tls_files:
        directory, filename = path.rsplit("/", 1)
        assert "secret" in volumes[volume_mounts[directory]]
        assert filename in ("tls.crt", "tls.key")  # the keys of a kubernetes.io/tls Secret
    # The SMTP Service: port 25 to the container's smtp port, selecting the email pods.
    labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    (smtp_service,) = [
        doc
        for doc in _load_all(DEPLOY / "k8s" / "email-service.yaml")
        if doc["metadata"]["labels"]["app.kubernetes.io/component"] == "email-smtp"
    ]
    assert smtp_service["spec"]["selector"].items() <= labels.items()
    (port,) = smtp_service["spec"]["ports"]
    assert (port["port"], port["targetPort"]) == (25, "smtp")
    # No other component's selector catches email pods.
    for other in ("sms", "social", "voice"):
        assert not _k8s(other)["Service"]["spec"]["selector"].items() <= labels.items()


# -- the durable spool --------------------------------------------------------------------------


def test_example_config_enables_the_spool_and_the_image_owns_its_directory(
    example_raw: dict[str, Any], secret_env: dict[str, str]
) -> None:
    """The shipped config spools (Twilio does not retry a 5xx: without it a broker outage loses
    their traffic), every other spool key at its default; the services hosting a connector that
    spools are exactly the ones the deployments give a volume (sms and voice); the image creates
    the state directory for the non-root user, so a fresh named volume mounted there is
    writable."""
    spool = load_config(EXAMPLE, environ=secret_env).spool
    assert spool.enabled
    assert spool.model_copy(update={"enabled": False}) == SpoolSettings()
    assert spool.path is None  # a file per service under state_dir, named by its channels
    assert Path(spool.state_dir).is_absolute()
    assert _spooling_services(example_raw) == {"sms", "voice"}
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert f"install -d -o 10001 -g 10001 {spool.state_dir}" in dockerfile
    assert re.search(r"^USER 10001:10001$", dockerfile, re.M)


@pytest.mark.parametrize("service", sorted(SERVICE_CHANNELS))
def test_compose_keeps_each_spooling_service_spool_on_its_own_named_volume(
    example_raw: dict[str, Any], service: str
) -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    state_dir = SpoolSettings.model_validate(example_raw["spool"]).state_dir
    mounts = {m.split(":")[1]: m.split(":")[0] for m in compose["services"][service]["volumes"]}
    if service not in _spooling_services(example_raw):
        assert state_dir not in mounts  # it opens no spool file
        return
    volume = mounts[state_dir]
    assert volume in compose["volumes"]  # a named volume: kept across restarts and rebuilds
    assert not volume.startswith((".", "/"))
    # Never shared with another service: each service's file is its own.
    for other in _spooling_services(example_raw) - {service}:
        other_mounts = [m.split(":")[0] for m in compose["services"][other]["volumes"]]
        assert volume not in other_mounts


@pytest.mark.parametrize("component", sorted(SERVICE_CHANNELS))
def test_kubernetes_spooling_services_are_statefulsets_with_a_claim_at_the_state_dir(
    example_raw: dict[str, Any], component: str
) -> None:
    """A spooled event lives only in its replica's file until the broker is back: the sms and
    voice pods each get a ReadWriteOnce PersistentVolumeClaim (kept when scaled down) mounted
    where the config puts the service's spool file, the root filesystem staying read-only."""
    settings = RuntimeSettings.model_validate(example_raw)
    docs = _k8s(component)
    workload = _workload(docs)
    pod = workload["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    state_dir = settings.spool.state_dir
    if component not in _spooling_services(example_raw):
        assert workload["kind"] == "Deployment"
        assert state_dir not in mounts
        return

    assert workload["kind"] == "StatefulSet"
    spec = workload["spec"]
    claims = {c["metadata"]["name"]: c["spec"] for c in spec["volumeClaimTemplates"]}
    claim = claims[mounts[state_dir]]
    assert mounts[state_dir] not in {v["name"] for v in pod.get("volumes", [])}  # no emptyDir
    assert claim["accessModes"] == ["ReadWriteOnce"]
    # Room for a full spool and SQLite's WAL beside it.
    storage = _quantity_bytes(claim["resources"]["requests"]["storage"])
    assert storage >= 2 * settings.spool.max_bytes
    assert spec["persistentVolumeClaimRetentionPolicy"] == {
        "whenDeleted": "Retain",
        "whenScaled": "Retain",
    }
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsUser"] == 10001
    # The service's spool file (the channels of its spooling connectors) is on that volume.
    spooling_channels = [
        name.split(".")[0]
        for name in example_raw["connectors"]
        if name.split(".")[0] in SERVICE_CHANNELS[component] and registry.load(name).spool_on_outage
    ]
    assert settings.spool.file_for(spooling_channels).parent == Path(state_dir)
    assert settings.spool.file_for(spooling_channels).name == f"{component}.sqlite"

    # The governing headless Service selects the same pods as the ClusterIP one.
    labels = spec["template"]["metadata"]["labels"]
    headless = docs["HeadlessService"]
    assert spec["serviceName"] == headless["metadata"]["name"]
    assert headless["spec"]["selector"] == docs["Service"]["spec"]["selector"]
    assert headless["spec"]["selector"].items() <= labels.items()
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert spec["podManagementPolicy"] == "Parallel"  # replicas are interchangeable


#: Writes and replays the largest event a webhook can carry (http.max_body_bytes) through a
#: spool file given as argv[1]; run inside the simulated pod filesystem below.
_SPOOL_PROBE = """
import asyncio, os, sys
from gateway.runtime.bus import OutgoingMessage
from gateway.runtime.spool import Spool

async def main() -> None:
    spool = Spool(sys.argv[1], max_events=10, max_bytes=2**30)
    await spool.open()
    try:
        body = os.urandom(int(sys.argv[2]))
        message = OutgoingMessage(body=body, message_id="big", type="gateway.api.v1.Event")
        await spool.put("sms.twilio", "channels.events", "message.received.sms.twilio", message)
        (row,) = await spool.lease(1, lease_seconds=30)
        assert row.message.body == body
        await spool.delete([row.seq])
    finally:
        await spool.close()

asyncio.run(main())
"""


def _spool_on_pod_filesystem(
    writable_tmp: set[str], unique: str
) -> subprocess.CompletedProcess[str]:
    """Run the probe as in a pod with a read-only root filesystem: the state dir writable (a
    tmpfs standing for the claim), the working directory read-only, and of /tmp and /var/tmp
    (where SQLite looks for a temporary directory) only those in ``writable_tmp`` writable,
    as an emptyDir makes them. Needs root for a private mount namespace (unshare -m)."""
    base = Path("/dev/shm") / f"cg-pod-{unique}"  # outside /tmp, which is remounted
    state, workdir = base / "state", base / "app"
    state.mkdir(parents=True)
    workdir.mkdir()
    # The checkout and its venv may themselves live under /tmp (a CI clone, say): they are
    # bound aside first and back into the fresh tmpfs, so the probe still finds its code.
    masked = ("/tmp", "/var/tmp")
    keep = sorted(
        {str(p) for p in (ROOT, Path(sys.prefix)) if any(p.is_relative_to(d) for d in masked)}
    )
    mounts = [f"mount -t tmpfs -o ro tmpfs {workdir}"]
    for i, path in enumerate(keep):
        (base / f"keep{i}").mkdir()
        mounts.append(f"mount --bind {path} {base}/keep{i}")
    for d in masked:
        mounts.append(f"mount -t tmpfs -o rw,size=256m tmpfs {d}")
        for i, path in enumerate(keep):
            if Path(path).is_relative_to(d):
                mounts += [f"mkdir -p {path}", f"mount --bind {base}/keep{i} {path}"]
        if d not in writable_tmp:
            mounts.append(f"mount -o remount,ro {d}")
    size = HttpSettings().max_body_bytes
    script = " && ".join([*mounts, f"cd {workdir}", f'exec "$0" -c "$1" {state}/sms.sqlite {size}'])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TMPDIR", "SQLITE_TMPDIR"))}
    try:
        return subprocess.run(
            ["unshare", "-m", "sh", "-c", script, sys.executable, _SPOOL_PROBE],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        shutil.rmtree(base)


@pytest.mark.parametrize("component", ["sms", "voice"])
def test_kubernetes_spool_writes_the_largest_event_on_the_read_only_root_filesystem(
    component: str, unique: str
) -> None:
    """SQLite needs a temporary directory for the statement journal of a large write (here a
    1 MiB event, the webhook body cap); with none writable on the read-only root filesystem the
    write fails ("disk I/O error") and the webhook gets a 503. The StatefulSets mount an
    emptyDir at /tmp, and with that the write and its replay succeed; without it (the control
    run) they fail, which is why the mount is there."""
    pod = _workload(_k8s(component))["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    writable = {
        m["mountPath"]
        for m in container["volumeMounts"]
        if "emptyDir" in volumes.get(m["name"], {}) and not m.get("readOnly")
    }
    assert "/tmp" in writable

    result = _spool_on_pod_filesystem(writable, unique)
    assert result.returncode == 0, result.stderr

    control = _spool_on_pod_filesystem(writable - {"/tmp", "/var/tmp"}, unique)
    assert control.returncode != 0, "the spool no longer needs a writable /tmp: drop the mount"
    assert "disk I/O error" in control.stderr


def test_kubernetes_spool_drain_job_mounts_a_scaled_away_replicas_claim(
    example_raw: dict[str, Any], tmp_path: Path
) -> None:
    """deploy/k8s/ops/spool-drain-job.yaml (applied by hand, not by kustomize): the claim a
    StatefulSet replica leaves behind, mounted where the config puts the spool, the file the
    sms service writes, and arguments the CLI accepts."""
    settings = RuntimeSettings.model_validate(example_raw)
    (job,) = _load_all(DEPLOY / "k8s" / "ops" / "spool-drain-job.yaml")
    assert job["kind"] == "Job"
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    assert not any(r.startswith("ops") for r in kustomization["resources"])
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    claim_name = volumes[mounts[settings.spool.state_dir]]["persistentVolumeClaim"]["claimName"]
    sms = _workload(_k8s("sms"))
    (template,) = sms["spec"]["volumeClaimTemplates"]
    match = re.fullmatch(
        rf"{template['metadata']['name']}-{sms['metadata']['name']}-(\d+)", claim_name
    )
    assert match is not None, claim_name
    assert int(match.group(1)) >= sms["spec"]["replicas"]  # an ordinal no longer running
    args = container["args"]
    assert args[:2] == ["spool", "drain"]
    assert Path(args[args.index("--path") + 1]) == settings.spool.file_for(["sms"])
    # Neither Service routes webhooks to the Job's pod.
    labels = job["spec"]["template"]["metadata"]["labels"]
    for component in SERVICE_CHANNELS:
        assert not _k8s(component)["Service"]["spec"]["selector"].items() <= labels.items()
    # Same Secret key and config as the services.
    env = {e["name"]: e for e in container["env"]}
    sms_env = {e["name"]: e for e in sms["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["CHANNEL_GATEWAY__BROKER__URL"] == sms_env["CHANNEL_GATEWAY__BROKER__URL"]
    assert env["CHANNEL_GATEWAY_CONFIG"] == sms_env["CHANNEL_GATEWAY_CONFIG"]
    # The CLI takes these arguments: here the file is missing, which it reports (status 2)
    # after parsing them (a parse error would print usage instead).
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        env={k: v for k, v in os.environ.items() if not k.startswith("CHANNEL_GATEWAY")},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert f"no spool file at {settings.spool.file_for(['sms'])}" in result.stderr
    assert "usage:" not in result.stderr


def test_compose_broker_user_file_is_valid_definitions(tmp_path: Path) -> None:
    """The compose broker writes its user as a definitions file at start-up (a node importing
    definitions on boot creates no default user): run that script and parse what it writes."""
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    rabbit = compose["services"]["rabbitmq"]
    assert rabbit["entrypoint"][:2] == ["/bin/sh", "-c"]
    script = rabbit["entrypoint"][2].replace("$$", "$")  # compose's escape for a literal $
    target = "/etc/rabbitmq/definitions.d/00-user.json"
    assert f"user_file={target}" in script
    assert script.rstrip().endswith("exec docker-entrypoint.sh rabbitmq-server")
    out = tmp_path / "00-user.json"
    runnable = (
        script.replace(f"user_file={target}", f"user_file={out}")
        .replace("chown rabbitmq:rabbitmq", "true")
        .replace("exec docker-entrypoint.sh rabbitmq-server", "")
    )
    password = "pw-" + secrets.token_urlsafe(12)
    result = subprocess.run(
        ["/bin/sh", "-c", runnable],
        env={"RABBITMQ_USER": "gw", "RABBITMQ_PASSWORD": password, "PATH": os.defpath},
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert result.returncode == 0, result.stderr
    assert out.stat().st_mode & 0o777 == 0o400
    written = json.loads(out.read_text())
    assert written["users"] == [{"name": "gw", "password": password, "tags": ["administrator"]}]
    assert written["vhosts"] == [{"name": "/"}]
    assert written["permissions"] == [
        {"user": "gw", "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"}
    ]
    # The topology file mounted next to it declares the same vhost.
    assert json.loads(DEFINITIONS.read_text())["vhosts"] == [{"name": "/"}]


# -- the gateway (gRPC API and ledger) ----------------------------------------------------------


def _compose_gateway() -> tuple[dict[str, Any], dict[str, Any]]:
    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    return services["gateway"], services["postgres"]


def test_compose_runs_the_gateway_on_postgresql() -> None:
    gateway, postgres = _compose_gateway()
    port = GatewaySettings().port
    assert gateway["command"] == ["run", "gateway"]
    assert gateway["build"]["dockerfile"] == "deploy/Dockerfile"
    env = gateway["environment"]
    assert env["CHANNEL_GATEWAY__GATEWAY__HOST"] == "0.0.0.0"
    assert int(env["CHANNEL_GATEWAY__GATEWAY__PORT"]) == port
    assert env["CHANNEL_GATEWAY__BROKER__URL"].endswith("@rabbitmq:5672/")
    # The ledger on the compose PostgreSQL, its password from the environment.
    ledger = env["CHANNEL_GATEWAY__GATEWAY__LEDGER_URL"]
    assert ledger.startswith("postgresql+asyncpg://gateway:${POSTGRES_PASSWORD}@postgres:5432/")
    assert ledger.rsplit("/", 1)[1] == postgres["environment"]["POSTGRES_DB"]
    assert postgres["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    assert "POSTGRES_PASSWORD=" in (DEPLOY / ".env.example").read_text()
    assert set(gateway["depends_on"]) == {"rabbitmq", "postgres"}
    assert gateway["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert f"127.0.0.1:{port}:{port}" in gateway["ports"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in gateway["volumes"]}
    assert mounts[env["CHANNEL_GATEWAY_CONFIG"]] == "./config.example.yaml"
    assert gateway["healthcheck"]["test"][:3] == ["CMD", "python", "-c"]


async def test_compose_gateway_healthcheck_asks_a_running_gateway(tmp_path: Path) -> None:
    """The healthcheck's Python snippet, pointed at an in-process gateway, exits 0; pointed at a
    closed port, it exits 1."""
    import asyncio

    from gateway.server.app import GatewayServer

    gateway_service, _ = _compose_gateway()
    snippet = gateway_service["healthcheck"]["test"][3]
    port = GatewaySettings().port
    assert f"127.0.0.1:{port}" in snippet
    assert "service='liveness'" in snippet
    bus = InMemoryBus()
    await bus.connect()
    settings = RuntimeSettings.model_validate(
        {
            "broker": {"url": "memory://"},
            "connectors": {"sms.twilio": {}},
            "gateway": {
                "port": 0,
                "ledger_url": f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}",
                "shutdown_grace": 0.5,
            },
        }
    )
    server = GatewayServer(settings, bus=bus)
    await server.start()
    try:
        for target, expected in ((server.address, 0), ("127.0.0.1:1", 1)):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", snippet.replace(f"127.0.0.1:{port}", target), cwd=ROOT
            )
            assert await asyncio.wait_for(proc.wait(), 30) == expected, target
    finally:
        await server.stop()
        await bus.close()


def test_kubernetes_gateway_probes_grpc_health_and_reads_the_ledger_url_from_a_secret() -> None:
    docs = _k8s("gateway")
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget"} <= set(docs)
    deployment, service = docs["Deployment"], docs["Service"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"] == ["run", "gateway"]
    port = GatewaySettings().port
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == port
    env = {e["name"]: e for e in container["env"]}
    assert env["CHANNEL_GATEWAY__GATEWAY__HOST"]["value"] == "0.0.0.0"
    assert int(env["CHANNEL_GATEWAY__GATEWAY__PORT"]["value"]) == port
    assert int(env["CHANNEL_GATEWAY__GATEWAY__METRICS_PORT"]["value"]) == ports["metrics"]
    # Both URLs carry passwords: from the Secret the SMS service uses too.
    sms_secret = _workload(_k8s("sms"))["spec"]["template"]["spec"]["containers"][0]["env"]
    (broker_ref,) = [
        e["valueFrom"]["secretKeyRef"]
        for e in sms_secret
        if e["name"] == "CHANNEL_GATEWAY__BROKER__URL"
    ]
    assert env["CHANNEL_GATEWAY__BROKER__URL"]["valueFrom"]["secretKeyRef"] == broker_ref
    ledger_ref = env["CHANNEL_GATEWAY__GATEWAY__LEDGER_URL"]["valueFrom"]["secretKeyRef"]
    assert ledger_ref == {"name": broker_ref["name"], "key": "ledger-url"}
    assert deployment["spec"]["replicas"] > 1  # hence PostgreSQL, never the SQLite default

    # gRPC health checking: readiness follows the API service (and so the broker), liveness
    # and start-up the "liveness" service, which the gateway keeps SERVING while it runs.
    from gateway.server.app import LIVENESS_SERVICE
    from gateway.server.service import SERVICE_NAME

    assert container["readinessProbe"]["grpc"] == {"port": port, "service": SERVICE_NAME}
    assert container["livenessProbe"]["grpc"] == {"port": port, "service": LIVENESS_SERVICE}
    assert container["startupProbe"]["grpc"] == {"port": port, "service": LIVENESS_SERVICE}
    grace = GatewaySettings().shutdown_grace
    assert pod["terminationGracePeriodSeconds"] > grace + 5  # preStop sleep, then the drain
    assert pod["securityContext"]["runAsNonRoot"] is True

    config_mount = next(
        m
        for m in container["volumeMounts"]
        if m["mountPath"] == env["CHANNEL_GATEWAY_CONFIG"]["value"]
    )
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert (
        volumes[config_mount["name"]]["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    )

    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # The SMS selectors must not catch gateway pods (and the other way round).
    sms_labels = _workload(_k8s("sms"))["spec"]["template"]["metadata"]["labels"]
    assert not service["spec"]["selector"].items() <= sms_labels.items()
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] in (port, "grpc")
    assert service_port["port"] == port
