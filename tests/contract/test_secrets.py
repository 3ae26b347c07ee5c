"""Secrets come from the environment or a file, never from the config itself."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import structlog
from pydantic import BaseModel, ValidationError

from gateway.contract.secrets import Secret

TOKEN = "a1b2c3d4e5f6-real-token-value"


class Settings(BaseModel):
    token: Secret


def _load(value: object, environ: dict[str, str] | None = None) -> Settings:
    return Settings.model_validate({"token": value}, context={"environ": environ or {}})


def test_secret_from_env() -> None:
    settings = _load({"env": "MY_TOKEN"}, {"MY_TOKEN": TOKEN})
    assert settings.token.get_secret_value() == TOKEN


def test_secret_from_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")  # trailing newline of `echo > file` is not part of it
    assert _load({"file": str(path)}).token.get_secret_value() == TOKEN


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (TOKEN, "never the secret itself"),
        ({"env": "MY_TOKEN", "file": "/x"}, "never the secret itself"),
        ({"vault": "x"}, "unknown secret source 'vault'"),
        ({"env": "UNSET_VAR"}, "environment variable UNSET_VAR is not set"),
        ({"file": "/nonexistent/secret"}, "cannot read secret file /nonexistent/secret"),
    ],
)
def test_bad_secret_references_are_refused(value: object, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        _load(value)


def test_empty_env_var_is_refused() -> None:
    with pytest.raises(ValidationError, match="MY_TOKEN is not set"):
        _load({"env": "MY_TOKEN"}, {"MY_TOKEN": ""})


def test_empty_secret_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("\n")
    with pytest.raises(ValidationError, match="is empty"):
        _load({"file": str(path)})


@pytest.mark.parametrize(
    "example", ["changeme", "CHANGE-ME-please", "your_auth_token", "<auth token>", "xxxxxxxxxxxx"]
)
def test_example_values_are_refused(example: str, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="example value"):
        _load({"env": "MY_TOKEN"}, {"MY_TOKEN": example})
    path = tmp_path / "token"
    path.write_text(example)
    with pytest.raises(ValidationError, match="example value"):
        _load({"file": str(path)})


def test_secret_never_printed(caplog: pytest.LogCaptureFixture) -> None:
    settings = _load({"env": "MY_TOKEN"}, {"MY_TOKEN": TOKEN})
    for text in (repr(settings), str(settings), settings.model_dump_json(), str(settings.token)):
        assert TOKEN not in text
    with caplog.at_level(logging.INFO):
        logging.getLogger("test").info("settings %s", settings)
    assert TOKEN not in caplog.text


def test_secret_not_in_structlog_lines(capsys: pytest.CaptureFixture[str]) -> None:
    settings = _load({"env": "MY_TOKEN"}, {"MY_TOKEN": TOKEN})
    log = structlog.wrap_logger(
        structlog.PrintLogger(), processors=[structlog.processors.JSONRenderer()]
    )
    log.info("loaded", settings=settings, token=settings.token)
    out = capsys.readouterr().out
    assert "loaded" in out
    assert TOKEN not in out


def test_validation_error_does_not_echo_the_secret() -> None:
    # The refused example value is not repeated in the message either.
    with pytest.raises(ValidationError) as info:
        _load({"env": "MY_TOKEN"}, {"MY_TOKEN": "changeme-" + TOKEN})
    assert TOKEN not in str(info.value)
