"""Ledger migration scripts, applied in revision order."""
