"""A private, throw-away RabbitMQ node for chaos tests.

Tests that stop, kill or cut the broker must never touch the shared one: this
starts a separate node (own node name, AMQP and distribution ports, data, log
and config directories, Erlang cookie) from the locally installed RabbitMQ,
and removes every trace of it on :meth:`RabbitMQNode.stop`.

    with RabbitMQNode.start() as node:
        url = node.url           # amqp://guest:guest@127.0.0.1:<port>/
        node.stop_app()          # broker down (connections cut, port closed)
        node.start_app()         # broker back
        node.pause()             # broker hung (SIGSTOP): connections open, no answers
        node.resume()

The node runs as a child process in its own process group; the helper only
ever signals that group. ``rabbitmqctl`` is run with ``HOME`` set to the node's
directory, so it reads the node's own cookie (not ``~/.erlang.cookie`` and not
the shared broker's).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

#: The un-wrapped scripts: ``/usr/sbin/*`` switch to the ``rabbitmq`` user and
#: its HOME (the shared node's cookie), which a private node must not use.
_SBIN_CANDIDATES = ("/usr/lib/rabbitmq/bin", "/usr/local/sbin", "/usr/sbin")


class RabbitMQNodeError(RuntimeError):
    """The private node could not be started or controlled."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _script(name: str) -> str:
    for directory in _SBIN_CANDIDATES:
        path = Path(directory) / name
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which(name)
    if found is None:
        raise RabbitMQNodeError(f"{name} is not installed")
    return found


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class RabbitMQNode:
    """One private RabbitMQ node; use :meth:`start` (a context manager)."""

    def __init__(self, base: Path, *, port: int, dist_port: int, name: str) -> None:
        self.base = base
        self.port = port
        self.dist_port = dist_port
        self.nodename = f"{name}@localhost"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """AMQP URL of the node (default guest user, allowed from localhost)."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def env(self) -> dict[str, str]:
        """Environment of the node's server and of ``rabbitmqctl`` against it."""
        base = self.base
        return {
            **os.environ,
            "HOME": str(base),
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_PID_FILE": str(base / "node.pid"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
            "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            # Erlang distribution on loopback only, like the AMQP listener.
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    @classmethod
    def start(cls, *, timeout: float = 60.0) -> Self:
        """Start a fresh node and wait until it accepts AMQP connections."""
        base = Path(tempfile.mkdtemp(prefix="cg-rabbitmq-"))
        node = cls(
            base,
            port=free_port(),
            dist_port=free_port(),
            name=f"cgtest-{secrets.token_hex(4)}",
        )
        try:
            node._prepare()
            node._spawn()
            node.wait_ready(timeout=timeout)
        except BaseException:
            node.stop()
            raise
        return node

    def _prepare(self) -> None:
        (self.base / "mnesia").mkdir()
        (self.base / "log").mkdir()
        # Its own listener: the system config would bind the shared broker's port.
        (self.base / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\n"
            "loopback_users.guest = true\n"
            # A test host may have little disk left; do not block publishers for it.
            "disk_free_limit.absolute = 1MB\n"
        )
        (self.base / "rabbitmq-env.conf").write_text("")
        (self.base / "enabled_plugins").write_text("[].\n")
        (self.base / "advanced.config").write_text("[].\n")
        cookie = self.base / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16).upper())
        cookie.chmod(0o400)

    def _spawn(self) -> None:
        log = (self.base / "log" / "console.log").open("wb")
        try:
            self._process = subprocess.Popen(
                [_script("rabbitmq-server")],
                env=self.env,
                cwd=self.base,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, signalled alone
            )
        finally:
            log.close()

    def wait_ready(self, *, timeout: float = 60.0) -> None:
        """Wait until the node accepts AMQP connections on its port."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                raise RabbitMQNodeError(
                    f"private RabbitMQ node exited with {self._process.returncode}: "
                    f"{self.console_tail()}"
                )
            if port_open(self.port):
                return
            time.sleep(0.1)
        raise RabbitMQNodeError(f"private RabbitMQ node not ready within {timeout}s")

    def wait_down(self, *, timeout: float = 30.0) -> None:
        """Wait until the node's AMQP port is closed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not port_open(self.port):
                return
            time.sleep(0.05)
        raise RabbitMQNodeError(f"private RabbitMQ node still listening after {timeout}s")

    def console_tail(self, chars: int = 2000) -> str:
        """The end of the node's console output (for error messages)."""
        path = self.base / "log" / "console.log"
        try:
            return path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no console output)"

    def ctl(self, *args: str, timeout: float = 30.0) -> str:
        """Run ``rabbitmqctl -n <node> <args>`` against this node; returns stdout."""
        try:
            out = subprocess.run(
                [_script("rabbitmqctl"), "-n", self.nodename, *args],
                env=self.env,
                cwd=self.base,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as exc:
            raise RabbitMQNodeError(f"rabbitmqctl {' '.join(args)} timed out") from exc
        if out.returncode != 0:
            raise RabbitMQNodeError(
                f"rabbitmqctl {' '.join(args)} failed ({out.returncode}): {out.stderr.strip()}"
            )
        return out.stdout

    def stop_app(self) -> None:
        """Stop the RabbitMQ application (clients disconnected, port closed); VM stays up."""
        self.ctl("stop_app")
        self.wait_down()

    def start_app(self, *, timeout: float = 30.0) -> None:
        """Start the RabbitMQ application again after :meth:`stop_app`."""
        self.ctl("start_app", timeout=timeout)
        self.wait_ready(timeout=timeout)

    def pause(self) -> None:
        """Freeze the node (SIGSTOP): connections stay open but nothing answers."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Unfreeze the node after :meth:`pause`."""
        self._signal(signal.SIGCONT)

    def _signal(self, sig: signal.Signals) -> None:
        if self._process is None or self._process.poll() is not None:
            raise RabbitMQNodeError("the private node is not running")
        os.killpg(self._process.pid, sig)

    def stop(self) -> None:
        """Stop the node (gracefully, then by force) and delete its directory."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGCONT)  # in case it was paused
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
            except ProcessLookupError:
                process.wait(timeout=10)
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
