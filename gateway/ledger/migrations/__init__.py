"""Alembic migrations of the delivery ledger (run with :meth:`gateway.ledger.Ledger.migrate`)."""
