"""Tests of gateway.runtime."""
