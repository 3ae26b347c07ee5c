"""SMS connector tests and the shared SMS helpers (encoding, addresses)."""
