"""Where an IMAP mailbox was read up to: UIDVALIDITY and the last UID done.

A UID is only meaningful with its mailbox's UIDVALIDITY: when the server
changes UIDVALIDITY (a rebuilt mailbox), every UID is new and the poller
starts over (the events' deterministic ids dedupe what was already
published). The state is a small JSON file per mailbox, replaced
atomically (write, fsync, rename) after each message is done, so a crash
re-reads at most the message in flight.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from gateway.contract import ConfigError


@dataclass(frozen=True, slots=True)
class Position:
    """UIDVALIDITY of the mailbox and the highest UID fully processed."""

    uidvalidity: int
    last_uid: int


class StateStore:
    """One JSON file per mailbox key under ``directory``."""

    def __init__(self, directory: str | Path) -> None:
        self._dir = Path(directory)
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create IMAP state directory {directory}: {exc}") from exc

    def _path(self, key: str) -> Path:
        return self._dir / f"{key}.json"

    def load(self, key: str) -> Position | None:
        """The saved position, or None on first start."""
        path = self._path(key)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"unreadable IMAP state {path}: {exc}") from exc
        try:
            return Position(uidvalidity=int(data["uidvalidity"]), last_uid=int(data["last_uid"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"malformed IMAP state {path}: {exc}") from exc

    def save(self, key: str, position: Position) -> None:
        """Replace the saved position atomically and durably."""
        path = self._path(key)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as handle:
            json.dump({"uidvalidity": position.uidvalidity, "last_uid": position.last_uid}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        directory = os.open(self._dir, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
