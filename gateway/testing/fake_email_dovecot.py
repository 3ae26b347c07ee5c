"""A private Dovecot IMAP server for tests: own config, free port, tmp mail dir.

Never a system service: the test starts ``dovecot -F`` with a config written
to a temporary directory (plain-text auth on 127.0.0.1, a passwd-file user,
Maildir storage) and stops that process. Needs the Debian package
``dovecot-imapd`` (``make setup`` installs it).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"


@dataclass(frozen=True, kw_only=True)
class DovecotServer:
    """A running private Dovecot: where it listens and its one user."""

    host: str
    port: int
    username: str
    password: str
    root: Path
    process: subprocess.Popen[bytes]

    def deliver(self, raw: bytes, *, folder: str = "INBOX") -> None:
        """Put a message in a folder via IMAP APPEND (as an MDA would deliver it)."""
        import imaplib

        with imaplib.IMAP4(self.host, self.port, timeout=10) as client:
            client.login(self.username, self.password)
            status, detail = client.append(folder, "", None, raw)
            if status != "OK":
                raise RuntimeError(f"APPEND failed: {detail!r}")

    def restart(self) -> DovecotServer:
        """Stop and start the same server (same data, same port)."""
        stop(self)
        return _launch(self.root, self.port, self.username, self.password)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _accounts() -> tuple[str, str, int, int]:
    """Login user, internal user, and the uid/gid mail is accessed as.

    Dovecot refuses to run its login and mail processes as root: as root the
    package's own unprivileged users are used, otherwise the current user.
    """
    if os.getuid() != 0:
        me = pwd.getpwuid(os.getuid()).pw_name
        return me, me, os.getuid(), os.getgid()
    mail = pwd.getpwnam("dovecot")
    return "dovenull", "dovecot", mail.pw_uid, mail.pw_gid


def _config(root: Path, port: int) -> str:
    login, internal, uid, gid = _accounts()
    return f"""
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
info_log_path = {root}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
# Tests fail logins on purpose: no 2 s penalty per failure.
auth_failure_delay = 0
default_internal_user = {internal}
default_login_user = {login}
first_valid_uid = {uid}
first_valid_gid = {gid}
mail_location = maildir:{root}/mail/%u
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={root}/home/%u
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service anvil {{
  chroot =
}}
service imap-login {{
  chroot =
}}
"""


def _launch(root: Path, port: int, username: str, password: str) -> DovecotServer:
    process = subprocess.Popen(
        [DOVECOT, "-F", "-c", str(root / "dovecot.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            err = process.stderr.read().decode() if process.stderr else ""
            log = (root / "dovecot.log").read_text() if (root / "dovecot.log").exists() else ""
            raise RuntimeError(f"dovecot exited ({process.returncode}): {err} {log[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return DovecotServer(
                host="127.0.0.1",
                port=port,
                username=username,
                password=password,
                root=root,
                process=process,
            )
        time.sleep(0.05)
    process.kill()
    raise RuntimeError("dovecot did not start listening within 10 s")


def start(root: Path, *, username: str = "support", password: str = "imap-pass-1") -> DovecotServer:
    """Write a private config under ``root`` and start Dovecot in the foreground."""
    if not Path(DOVECOT).exists():
        raise RuntimeError("dovecot is not installed: run `make setup` (dovecot-imapd)")
    for sub in ("run", "state", "mail", "home"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "passwd").write_text(f"{username}:{{PLAIN}}{password}\n")
    port = _free_port()
    (root / "dovecot.conf").write_text(_config(root, port))
    _, _, uid, gid = _accounts()
    for sub in ("mail", "home"):
        os.chown(root / sub, uid, gid)
    os.chmod(root, 0o755)
    return _launch(root, port, username, password)


def stop(server: DovecotServer) -> None:
    """Stop the test's Dovecot (its own process only)."""
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(timeout=5)


@contextlib.contextmanager
def running(root: Path | None = None) -> Iterator[DovecotServer]:
    """A private Dovecot for the duration of the block.

    Without ``root`` it lives in a fresh directory under the system temp dir
    (removed afterwards): Dovecot's unprivileged users must be able to reach
    it, which a pytest ``tmp_path`` of root (mode 0700 parents) does not allow.
    """
    own = root is None
    base = Path(tempfile.mkdtemp(prefix="cg-dovecot-")) if root is None else root
    server = start(base)
    try:
        yield server
    finally:
        stop(server)
        if own:
            shutil.rmtree(base, ignore_errors=True)
