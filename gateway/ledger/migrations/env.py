"""Alembic environment of the ledger.

:meth:`gateway.ledger.Ledger.migrate` runs migrations programmatically: it
passes an open (sync-adapted) connection in ``config.attributes["connection"]``.
Running the ``alembic`` command line with ``-x url=...`` works too (offline
SQL generation with ``--sql``).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine
from sqlalchemy.engine import Connection

from gateway.ledger.schema import metadata

config = context.config
VERSION_TABLE = "ledger_alembic_version"


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def run() -> None:
    """Entry point alembic calls when it loads this module."""
    connection = config.attributes.get("connection")
    if context.is_offline_mode():
        url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option(
            "sqlalchemy.url"
        )
        context.configure(url=url, target_metadata=metadata, version_table=VERSION_TABLE)
        with context.begin_transaction():
            context.run_migrations()
    elif isinstance(connection, Connection):
        _configure(connection)
    else:
        url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option(
            "sqlalchemy.url"
        )
        if not url:
            raise RuntimeError("no database: pass -x url=<sync SQLAlchemy URL>")
        engine = create_engine(url)
        try:
            with engine.begin() as conn:
                _configure(conn)
        finally:
            engine.dispose()


run()
