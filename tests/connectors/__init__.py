"""Connector tests, one folder per channel and provider."""
