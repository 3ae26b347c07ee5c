"""``channel-gateway telegram set-webhook``: setWebhook with the configured secret token."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

import pytest
import yaml

from gateway.cli import main
from gateway.testing.fake_telegram import FakeTelegram

TOKEN = "7000000005:" + secrets.token_urlsafe(20)
SECRET = "cli_" + secrets.token_hex(8)


def write_config(tmp_path: Path, api: str, public: str | None) -> Path:
    config: dict[str, object] = {
        "broker": {"url": "memory://"},
        "connectors": {
            "telegram.bot": {
                "api_base_url": api,
                "bots": {
                    "support": {
                        "token": {"env": "CLI_TG_TOKEN"},
                        "secret_token": {"env": "CLI_TG_SECRET"},
                    }
                },
            }
        },
    }
    if public:
        config["http"] = {"public_base_url": public}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def test_set_webhook_registers_the_route_and_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CLI_TG_TOKEN", TOKEN)
    monkeypatch.setenv("CLI_TG_SECRET", SECRET)
    async with FakeTelegram(tokens=(TOKEN,)) as fake:
        config = write_config(tmp_path, fake.url, "https://gw.example")
        argv = ["--config", str(config), "telegram", "set-webhook", "support"]
        assert await asyncio.to_thread(main, argv) == 0
        (call,) = fake.all_calls
        assert call.method == "setWebhook"
        assert call.params["url"] == "https://gw.example/webhooks/telegram/bot/support"
        assert call.params["secret_token"] == SECRET
        assert "https://gw.example/webhooks/telegram/bot/support" in capsys.readouterr().out
        # Telegram refuses: a clear error and a non-zero exit, the token never printed.
        fake.reject_next("Bad Request: bad webhook: HTTPS url must be provided for webhook")
        assert await asyncio.to_thread(main, [*argv, "--url", "http://insecure"]) == 1
        err = capsys.readouterr().err
        assert "HTTPS url must be provided" in err
        assert TOKEN not in err


async def test_set_webhook_needs_a_public_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CLI_TG_TOKEN", TOKEN)
    monkeypatch.setenv("CLI_TG_SECRET", SECRET)
    config = write_config(tmp_path, "http://127.0.0.1:9", None)
    argv = ["--config", str(config), "telegram", "set-webhook", "support"]
    assert await asyncio.to_thread(main, argv) == 2
    assert "public_base_url" in capsys.readouterr().err
