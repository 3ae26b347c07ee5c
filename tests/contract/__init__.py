"""Tests of gateway.contract."""
