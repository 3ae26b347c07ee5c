"""Connector packages: one folder per channel, one sub-folder per provider."""
